"""Checkpoint conversion (GGUF -> Hugging Face layout)."""
