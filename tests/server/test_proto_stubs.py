"""The committed gRPC stubs in clients/aspen/v1 match proto/aspen/v1/aspen.proto (regenerate with `make proto`)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUB_DIR = os.path.join("clients", "aspen", "v1")
STUBS = ("aspen_pb2.py", "aspen_pb2_grpc.py", "aspen_pb2.pyi")


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iclients=proto", f"--python_out={tmp_path}",
           f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "proto/aspen/v1/aspen.proto"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    stale = []
    for name in STUBS:
        with open(os.path.join(tmp_path, STUB_DIR, name), encoding="utf-8") as f:
            fresh = f.read()
        with open(os.path.join(ROOT, STUB_DIR, name), encoding="utf-8") as f:
            committed = f.read()
        if fresh != committed:
            stale.append(name)
    assert not stale, f"{stale} in {STUB_DIR} are stale: run `make proto` and commit the result"


def test_stubs_import_under_the_clients_package():
    from clients.aspen.v1 import aspen_pb2, aspen_pb2_grpc

    assert aspen_pb2.DESCRIPTOR.package == "aspen.v1"
    assert set(aspen_pb2.DESCRIPTOR.services_by_name) == {"GenerationService", "AdapterService"}
    with open(aspen_pb2_grpc.__file__, encoding="utf-8") as f:
        source = f.read()
    assert "from clients.aspen.v1 import aspen_pb2" in source and "\nfrom aspen" not in source
