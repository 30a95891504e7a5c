"""Llama model code shared by compression, evaluation and the worker."""
