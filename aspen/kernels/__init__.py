"""The project's CPU kernels: C++ sources in ``csrc/`` (one ``.cpp`` per extension and the header they share),
one thin wrapper module per extension that falls back to torch where the kernel does not apply, and the loader
that builds them once per machine into a cache every install shares (:mod:`~aspen.kernels.extension`,
:mod:`~aspen.kernels.build_cache`, :mod:`~aspen.kernels.builder`; :mod:`~aspen.kernels.catalog` says which a model
uses). ``triton_bgmv`` is the CUDA LoRA op (Triton, compiled by Triton itself)."""
