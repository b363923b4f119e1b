"""ASPEN serve engine: scheduling, batching, KV blocks, adapter cache, gRPC server."""
