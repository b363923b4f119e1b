"""Generated from ``proto/aspen/v1/aspen.proto`` by ``make proto``; do not edit ``*_pb2*.py`` by hand."""
