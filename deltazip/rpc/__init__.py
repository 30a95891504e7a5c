"""gRPC plumbing shared by every DeltaZip service and the SDK (no torch)."""
