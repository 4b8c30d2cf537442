"""nolaserve clients: Python client and CLI."""
