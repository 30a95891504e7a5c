"""Delta store service: disk-backed artifacts, pushed and fetched over gRPC (no torch)."""
