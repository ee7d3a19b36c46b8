"""The embedded demo: a tiny offline Llama-style model and generated multi-task data."""
