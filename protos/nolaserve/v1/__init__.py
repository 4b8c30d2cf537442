"""Generated gRPC stubs of the ``nolaserve.v1`` proto package, beside their .proto sources
(regenerate: ``python -m nolaserve.v1._generate``; a test fails when they are stale).

The lowest layer: the server, the clients and the tests all import their messages from
here, and nothing here imports the rest of nolaserve."""
