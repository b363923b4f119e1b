"""Which of the project's C++ extensions a model uses, by device and weight layout."""
from __future__ import annotations

from aspen.kernels import adapter_kernels, cpu_kernels, fused_ops, mkl_packed, panel_gemm, sgmv
from aspen.kernels.extension import Extension


def all_extensions() -> list[Extension]:
    """Every extension of the project (those that do not apply on this machine are None when loaded)."""
    return extensions_for("cpu", packed_gemm=True)


def extensions_for(device_type: str, packed_gemm: bool) -> list[Extension]:
    """The extensions a model on ``device_type`` uses: on the CPU the decode, SGMV, fused elementwise and
    adapter-loading kernels, and with ``packed_gemm`` (float32 weights held in a packed GEMM layout) both packed
    GEMMs; on other devices only the adapter-loading kernels (adapters are validated on the host)."""
    wanted = [adapter_kernels.EXTENSION]
    if device_type == "cpu":
        wanted += [cpu_kernels.EXTENSION, fused_ops.EXTENSION, sgmv.EXTENSION]
        if packed_gemm:
            wanted += [mkl_packed.EXTENSION, panel_gemm.EXTENSION]
    return wanted
