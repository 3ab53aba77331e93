"""Kubernetes operator: TTTJob (and TTTSweep) custom resources to KubeRay RayJobs."""
