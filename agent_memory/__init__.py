"""agent-memory: a continual-learning memory daemon that bakes facts into LoRA deltas."""

__version__ = "0.1.0"
