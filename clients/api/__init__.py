"""Generated gRPC stubs of protos/nolaserve/v1 (regenerate: python -m
nolaserve.clients.api._generate; a test fails when they are stale)."""
