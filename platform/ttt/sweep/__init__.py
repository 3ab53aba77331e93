"""Sweeps over config fields: the spec and its trials (`spec`), run on this machine with Ray Tune (`local`,
drawn by `plots`) or on Kubernetes as TTTSweeps."""
