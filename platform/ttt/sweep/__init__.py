"""Sweeps over config fields: the spec and its trials (`spec`), run locally with Ray Tune or as TTTSweeps."""
