#!/bin/sh
# The GGML CPU options for building llama.cpp (benchmark-only, `make bench-llamacpp`) on this machine.
# GGML_NATIVE builds llama.cpp's AMX kernels wherever the CPU lists AMX. On a VM that lists it (Xeon, kernel
# granting the tile state), llama.cpp 0.3.36's AMX matmul segfaulted at the first batched evaluation, so where
# AMX is listed the build names the vector ISAs the CPU lists instead, AMX left out. LLAMACPP_AMX=on keeps native.
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { case "$flags" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if ! has amx_tile || [ "${LLAMACPP_AMX:-off}" = on ]; then
  echo "-DGGML_NATIVE=ON"
  exit 0
fi
opts="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
            avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
  has "${pair%%:*}" && opts="$opts -DGGML_${pair#*:}=ON"
done
echo "$opts"
