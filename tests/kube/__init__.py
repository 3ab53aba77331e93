"""A fake Kubernetes API server for tests, and CRD admission as pure functions."""
