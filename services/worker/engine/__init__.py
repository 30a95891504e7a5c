"""Continuous-batching engine core of the worker (nano-vllm style)."""
