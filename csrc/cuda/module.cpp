// The Python module flashgen._C_cuda. The CUDA kernels register themselves as flashgen_cuda::* ops
// (TORCH_LIBRARY_FRAGMENT + TORCH_LIBRARY_IMPL(flashgen_cuda, CUDA, m)) in their own csrc/cuda/*.cu files;
// importing this module loads them. Only pybind11 is included: torch/extension.h costs a minute per build.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashgen CUDA kernels (registered as flashgen_cuda::* ops for the CUDA dispatch key)";
}
