"""ttt-platform: train, sweep and compare TTT-E2E models."""

__version__ = "0.1.0"
