"""The baking engine: its settings (config.py, no torch); the engine itself is agent_memory/baking.py."""
