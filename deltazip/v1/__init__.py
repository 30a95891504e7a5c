"""Generated gRPC stubs for package deltazip.v1 (written by `make protos`)."""
