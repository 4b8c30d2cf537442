"""nolaserve server: engine, gRPC service and configuration."""
