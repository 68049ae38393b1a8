// Run-time CPU feature checks. The extension is compiled for a baseline (-march, default x86-64-v3);
// kernels with an AVX-512 path compile it with __attribute__((target(...))) and choose it here at run
// time, so one build runs on machines with and without AVX-512.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

namespace flashgen::cpu {

inline bool has_avx512() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return v;
}

inline bool has_avx512_vnni() {
  static const bool v = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return v;
}

inline bool has_avx512_bf16() {
  static const bool v = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return v;
}

// AMX tiles with int8 products. Linux hands a process the tile state only when asked (arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA, Linux 5.16+); without that the first tile instruction faults, so the request
// is part of the check.
inline bool has_amx_int8() {
  static const bool v = has_avx512_vnni() && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
                        syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return v;
}

inline bool has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}

}  // namespace flashgen::cpu

#define FLASHGEN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FLASHGEN_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define FLASHGEN_AMX_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,amx-tile,amx-int8")))
#define FLASHGEN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
