"""Transport security and access control shared by services, SDK and CLI: TLS files, tokens, tenants (no torch)."""
