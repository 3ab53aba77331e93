"""Evaluation: validation loss and loss by position within the context."""
