// The Python module flashgen._C. Kernels register themselves with TORCH_LIBRARY_IMPL(flashgen, CPU, m)
// in their own files; this file only makes the shared library importable and reports CPU features.
#include <omp.h>
#include <torch/extension.h>

#include "cpu/cpu_features.h"
#include "cpu/ggml.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashgen CPU kernels (registered as flashgen::* ops for the CPU dispatch key)";
  m.def("cpu_features", [] {
    using namespace flashgen::cpu;
    return std::map<std::string, bool>{{"avx2", has_avx2()},
                                       {"avx512", has_avx512()},
                                       {"avx512_vnni", has_avx512_vnni()},
                                       {"avx512_bf16", has_avx512_bf16()},
                                       {"amx_int8", has_amx_int8()}};
  });
  m.def("omp_max_threads", [] { return omp_get_max_threads(); });
  // The CPU layout's bytes per (16-row tile, super-block) of a GGML type (the prepack op's fake shapes).
  m.def("ggml_tile_bytes", [](int64_t type) { return flashgen::cpu::quant::ggml::kind_of(type, "ggml_tile_bytes").tile_bytes(); });
}
