"""Client side of ASPEN serve: generated gRPC stubs, a typed client, the load tester."""
