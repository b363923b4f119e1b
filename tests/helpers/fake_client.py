"""A stand-in for :class:`clients.client.AspenClient` that records its LoadAdapter calls instead of sending them."""
from __future__ import annotations


def recording_client(calls: list[tuple[str, str, str]]) -> type:
    """A client class whose ``load_adapter`` appends ``(address, adapter_id, path)`` to ``calls``."""

    class RecordingClient:
        def __init__(self, address: str, timeout: float | None = None) -> None:
            self.address = address

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def load_adapter(self, adapter_id: str, path: str) -> None:
            calls.append((self.address, adapter_id, path))

    return RecordingClient
