"""Generated gRPC stubs of the ``aspen.v1`` wire contract (``make proto`` regenerates them)."""
