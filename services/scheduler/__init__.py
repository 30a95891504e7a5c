"""Scheduler service: the public Generate API; stateless, routes to workers through Redis state (no torch)."""
