"""The C++ sources of the project's extensions (:mod:`aspen.kernels.extension` builds them). A package, so that
packaging ships its ``.cpp`` and ``.h`` files as this package's data."""
