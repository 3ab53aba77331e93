"""Distribution: DeepSpeed ZeRO around the meta-learning step, and the Ray Train launcher."""
