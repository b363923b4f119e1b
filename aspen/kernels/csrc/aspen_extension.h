// What every extension of the project includes in place of <torch/extension.h>: ATen's tensors and operators,
// torch's pybind11 type casters for them, and torch::wrap_pybind_function (which turns C++ errors and warnings
// into Python's). <torch/extension.h> brings in torch's whole C++ frontend as well (modules, optimisers, data
// loaders), which none of the extensions uses and which takes about as long to compile as all of the rest.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>
