"""Test scaffolding kept out of the package: tiny HF Llama checkpoints (torch), a fake Anthropic Messages API
server, and multi-process helpers. Tests import these as `helpers.<module>` (pytest puts tests/ on sys.path)."""
