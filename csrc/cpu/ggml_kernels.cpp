// GEMM kernels over the GGML tiles of ggml.h: int8 activations x GGML codes.
//
// Activations are rounded to int8 per super-block of S features, as llama.cpp rounds them for K-quants (Q8_K) and
// per 32 for the others (Q8_0): x' = d_a a, with is_j the integer sum of a over sub-block j. Per super-block,
// tile row n and activation row r, every kernel computes the bracket I and the min term M exactly,
//   I = sum_j sc[n, j] * (dot_j(a, q[n]) - zero * is_j) (int32),   M = sum_j mn[n, j] is_j,
// and then the same float operations, y[r, n] = fma(d[n] d_a, I, y) - dmin[n] d_a M (finish512, finish_half),
// so the AVX2, VNNI and AMX kernels give the same bits, and a row's result never depends on which ran it.
// - AVX2: maddubs of unsigned codes by signed activations (int16 pair sums added in int16 for as many groups as
//   the code width allows), then madd by the sub-block scales, and the zero and min terms as one madd per pair of
//   sub-blocks against the activation sums. A tile's codes are unpacked one group of 4 features x 8 rows at a time,
//   as used, which keeps every row's int16 sums in registers (2048 x 2048 Q6_K at 4 / 16 rows: 0.55 -> 0.38 /
//   2.1 -> 1.2-1.5 ms on one core). On AVX2, 4-bit codes in sub-blocks of 32 (Q4_0, Q4_1, Q4_K) go through
//   tile4_avx2, whose one pass covers both halves of a tile.
// - VNNI: vpdpbusd per sub-block, scaled with vpmulld. A tile-block's codes are unpacked once per call into 8
//   vectors of 4 features x 16 rows and serve the call's R rows. 4-bit blocks of 32 (Q4_0, Q4_1, IQ4_NL) go
//   through tile32_vnni, shaped as int4's kernel.
// - AMX (prompts: at least kAmxMinRows rows; every type but Q4_1, IQ4_NL and IQ4_XS): tile products over whole
//   super-blocks, the scales split into digits (ggml_amx.cpp).
// GCC 12 warns inside its own avx512fintrin.h (intrinsics that start from a deliberately undefined vector); the
// warning is attributed to the header, so it is silenced first.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu/cpu_features.h"
#include "cpu/ggml.h"
#include "cpu/ggml_avx512.h"
#include "cpu/tile_driver.h"

namespace flashgen::cpu::quant::ggml {
namespace {

constexpr int kVnniRows = 4, kVnniTiles = 2, kAvx2Rows = 4, kTile4Rows = 5;
// Up to this many rows (decode), tile_vnni takes two tiles per call: two weight streams per core (2 threads, 1B
// Q4_K_M decode, 3 alternating rounds: 19.0-21.1 -> 21.7-22.6 tok/s; four tiles per call: 19.5-22.1, against
// 22.5-24.8 for two in the same run).
constexpr int kVnniPairRows = 2;
// Fewer rows go through the VNNI kernels (2 threads, 2048 x 2048, GMAC/s VNNI / AMX: Q4_K 16 rows 207 / 196, 24 rows
// 215 / 264; Q6_K 108 / 112, 123 / 168).
constexpr int64_t kAmxMinRows = 24;

// ---------------------------------------------------------------- AVX-512 VNNI
template <int KI, int R, int C>
FLASHGEN_AVX512_VNNI void tile_vnni(const QuantActs& x, const uint8_t* w, int64_t w_stride, int64_t sbs, float* out,
                                    int64_t ldo) {
  constexpr Kind kd = kKinds[KI];
  constexpr int nb = kd.super / kBlock, halves = kBlock / kd.sub, gps = kd.sub / 4, subs = kd.super / kd.sub;
  constexpr int zero = kd.lut ? kLutZero : kd.zero;
  const __m512i lut = iq4_lut();
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < sbs; ++s) {
    __m512i iacc[C][R];
    __m512 macc[C][R];
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) iacc[c][r] = _mm512_setzero_si512(), macc[c][r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b)
      for (int c = 0; c < C; ++c) {
        const uint8_t* p = w + c * w_stride + s * kd.tile_bytes();
        // Decode: asking for the weights ahead keeps each core's two streams busy (1B Q4_K_M decode, 4 alternating
        // rounds: 25.1-27.3 -> 31.4-33.7 tok/s; the code loads were where the time went).
        if constexpr (R == 1) prefetch_part<kd.tile_bytes(), nb>(p, b);
        __m512i q[8];
        unpack512<KI>(p + b * kd.code_bytes(), q);
        if constexpr (kd.lut)
          for (int g = 0; g < 8; ++g) q[g] = _mm512_shuffle_epi8(lut, q[g]);
        const int64_t blk = s * nb + b;
        for (int h = 0; h < halves; ++h) {
          const int j = b * halves + h;
          const __m512i sc = sub_scale<KI>(p, j);
          const __m512 mnf = sub_min<KI>(p, j);
          for (int r = 0; r < R; ++r) {
            const int8_t* a = x.a + r * x.a_stride + blk * kBlock;
            __m512i id = _mm512_setzero_si512();
            for (int g = h * gps; g < (h + 1) * gps; ++g) id = _mm512_dpbusd_epi32(id, q[g], _mm512_set1_epi32(load4(a + 4 * g)));
            const int64_t at = r * x.isum_stride + s * subs + j;
            if constexpr (zero != 0) id = _mm512_sub_epi32(id, _mm512_set1_epi32(zero * x.isum[at]));
            iacc[c][r] = _mm512_add_epi32(iacc[c][r], kd.scales ? _mm512_mullo_epi32(id, sc) : id);
            if constexpr (kd.mins) macc[c][r] = _mm512_fmadd_ps(mnf, _mm512_set1_ps(x.fsum[at]), macc[c][r]);
          }
        }
      }
    for (int c = 0; c < C; ++c) {
      const uint8_t* p = w + c * w_stride + s * kd.tile_bytes();
      const __m512 d = halfx16(p + kd.d_offset());
      const __m512 dmin = kd.mins ? halfx16(p + kd.dmin_offset()) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r)
        acc[c][r] = finish512<KI>(acc[c][r], iacc[c][r], d, dmin, x.d[r * x.d_stride + s], macc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo + c * kTileRows, acc[c][r]);
}

// 4-bit blocks of 32 with one d (Q4_0, Q4_1, IQ4_NL): tile_vnni's sums, but shaped as int4's kernel: C tiles side
// by side share each broadcast activation, and the codes are unpacked 64 bytes (8 features) at a time, so the
// accumulators of C x R rows fit the registers. The float operations are tile_vnni's (its sub-block sums of one
// term are that term exactly), so results do not change. Measured against the int4 kernels on the same codes,
// alternating in one process (2 threads): 1B Q4_0 prefill +6%, decode +28%; default model (Q4_1) -4% / +7%.
template <int KI, int R, int C>
FLASHGEN_AVX512_VNNI void tile32_vnni(const QuantActs& x, const uint8_t* w, int64_t w_stride, int64_t sbs, float* out,
                                      int64_t ldo) {
  constexpr Kind kd = kKinds[KI];
  constexpr int zero = kd.lut ? kLutZero : kd.zero;
  const __m512i lut = iq4_lut();
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < sbs; ++s) {
    __m512i id[C][R];
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) id[c][r] = _mm512_setzero_si512();
    for (int v = 0; v < 4; ++v) {
      __m512i lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const __m512i raw = _mm512_loadu_si512(w + c * w_stride + s * kd.tile_bytes() + v * 64);
        lo[c] = _mm512_and_si512(raw, low), hi[c] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        if constexpr (kd.lut) lo[c] = _mm512_shuffle_epi8(lut, lo[c]), hi[c] = _mm512_shuffle_epi8(lut, hi[c]);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* a = x.a + r * x.a_stride + s * kBlock + v * 8;
        const __m512i a0 = _mm512_set1_epi32(load4(a)), a1 = _mm512_set1_epi32(load4(a + 4));
        for (int c = 0; c < C; ++c)
          id[c][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(id[c][r], lo[c], a0), hi[c], a1);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = r * x.isum_stride + s;
      for (int c = 0; c < C; ++c) {
        const uint8_t* p = w + c * w_stride + s * kd.tile_bytes();
        const __m512i bracket = zero ? _mm512_sub_epi32(id[c][r], _mm512_set1_epi32(zero * x.isum[at])) : id[c][r];
        acc[c][r] = finish512<KI>(acc[c][r], bracket, halfx16(p + kd.d_offset()),
                                  kd.mins ? halfx16(p + kd.dmin_offset()) : _mm512_setzero_ps(), x.d[r * x.d_stride + s],
                                  _mm512_set1_ps(x.fsum[at]));
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo + c * kTileRows, acc[c][r]);
}

// ---------------------------------------------------------------- AVX2 (each 256-bit half: 8 rows)
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load64(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }

// f(std::integral_constant<int, i>) for i = First, First + Step, ... < Last: loops whose index must be a
// compile-time constant (shift counts, register arrays), whatever the compiler's unrolling heuristics decide.
template <int First, int Last, int Step = 1, class F>
inline void static_for(F&& f) {
  if constexpr (First < Last) {
    f(std::integral_constant<int, First>{});
    static_for<First + Step, Last, Step>(f);
  }
}

// An empty asm the value passes through: GCC otherwise reassociates a long run of integer vector adds into a
// tree whose leaves (every product of the run, for every row) are all live at once and spill to the stack. Runs
// of 1 or 2 groups (Q6_K, IQ4) are left to the compiler: there the barrier only costs (2048 x 2048 at 16 rows,
// one core: Q6_K 1.50 vs 1.15 ms, IQ4_XS 1.7 vs 1.3; with it Q4_K 0.94 vs 1.01, Q4_1 1.16 vs 1.51).
inline void keep_in_register(__m256i& v) { asm("" : "+x"(v)); }

// Codes of group g (features 4g .. 4g + 3) of the 8 rows at c (a tile-block's codes offset by the half), from
// the planes of ggml.h. Each group is unpacked where it is used, so only one group's codes are live at a time.
template <int KI, int G>
inline __m256i group_codes(const uint8_t* c) {
  constexpr Kind kd = kKinds[KI];
  __m256i q;
  if constexpr (kd.lo_bits == 4) {
    const __m256i raw = load256(c + G / 2 * 64);
    q = _mm256_and_si256(G % 2 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0F));
  } else {
    q = _mm256_and_si256(_mm256_srli_epi16(load256(c + G / 4 * 64), 2 * (G % 4)), _mm256_set1_epi8(0x03));
  }
  if constexpr (kd.hi_bits == 1) {  // bit G of each byte -> bit lo_bits
    const __m256i h = load256(c + kd.lo_bytes());
    const __m256i moved = G >= kd.lo_bits ? _mm256_srli_epi16(h, G - kd.lo_bits) : _mm256_slli_epi16(h, kd.lo_bits - G);
    q = _mm256_or_si256(q, _mm256_and_si256(moved, _mm256_set1_epi8(1 << kd.lo_bits)));
  } else if constexpr (kd.hi_bits == 2) {  // bits 2 (G % 4), +1 -> bits 4, 5
    const __m256i h = load256(c + kd.lo_bytes() + G / 4 * 64);
    constexpr int up = 4 - 2 * (G % 4);
    const __m256i moved = up > 0 ? _mm256_slli_epi16(h, up) : up < 0 ? _mm256_srli_epi16(h, -up) : h;
    q = _mm256_or_si256(q, _mm256_and_si256(moved, _mm256_set1_epi8(0x30)));
  }
  return q;
}

inline __m256 halfx8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Sub-block j's scales (int8) and mins (uint8) of the 8 rows of half rh, one byte per row.
template <int KI>
inline __m128i scales8(const uint8_t* p, int j, int rh) {
  constexpr Kind kd = kKinds[KI];
  if constexpr (!kd.scales) return _mm_set1_epi8(1);
  const __m128i raw = load64(p + kd.sc_offset() + j * kTileRows + rh * 8);
  return kd.nibble_scales ? _mm_and_si128(raw, _mm_set1_epi8(0xF)) : raw;
}
template <int KI>
inline __m128i mins8(const uint8_t* p, int j, int rh) {
  constexpr Kind kd = kKinds[KI];
  if constexpr (!kd.mn_plane()) return _mm_set1_epi8(1);
  const __m128i raw = load64(p + kd.mn_offset() + j * kTileRows + rh * 8);
  return kd.nibble_scales ? _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0xF)) : raw;
}

// maddubs lanes of a run of groups summed in int16: each lane adds 2 products of at most max_code * 127.
constexpr int run16(const Kind& kd, int gps) {
  const int max_code = kd.lut ? 127 : (1 << (kd.lo_bits + kd.hi_bits)) - 1;
  int run = 1;
  while (run * 2 <= gps && run * 2 * 2 * max_code * 127 <= 32767) run *= 2;
  return run;
}

// The end of super-block s for half rh of a tile (8 rows) and R activation rows: acc += d d_a (dot - zero off)
// - dmin d_a off, where dot holds sum_j sc_j dot_j and off = sum_j c_j is_j, c the scales (a zero's term) or the
// mins, summed by pairs of sub-blocks: (c_j, c_j+1) per row against the activation sums (is_j, is_j+1).
template <int KI, int R>
inline void finish_half(const QuantActs& x, const uint8_t* p, int64_t s, int rh, const __m256i (&dot)[R],
                        __m256 (&acc)[R]) {
  constexpr Kind kd = kKinds[KI];
  constexpr int subs = kd.super / kd.sub;
  __m256i off[R];
  for (int r = 0; r < R; ++r) off[r] = _mm256_setzero_si256();
  if constexpr (subs == 1 && !kd.scales && !kd.mn_plane()) {  // every c is 1
    for (int r = 0; r < R; ++r) off[r] = _mm256_set1_epi32(x.isum[r * x.isum_stride + s]);
  } else if constexpr (kd.zero || kd.mins) {
    auto coef = [&](int j) { return kd.mins ? mins8<KI>(p, j, rh) : scales8<KI>(p, j, rh); };
    for (int j = 0; j < subs; j += 2) {
      const __m128i c8 = _mm_unpacklo_epi8(coef(j), subs > 1 ? coef(j + 1) : _mm_setzero_si128());
      const __m256i c16 = kd.mins ? _mm256_cvtepu8_epi16(c8) : _mm256_cvtepi8_epi16(c8);
      for (int r = 0; r < R; ++r) {
        const int16_t* is = x.isum + r * x.isum_stride + s * subs + j;
        const int32_t pair = subs > 1 ? (uint16_t(is[0]) | int32_t(is[1]) << 16) : uint16_t(is[0]);
        off[r] = _mm256_add_epi32(off[r], _mm256_madd_epi16(c16, _mm256_set1_epi32(pair)));
      }
    }
  }
  const __m256 d = halfx8(p + kd.d_offset() + rh * 16);
  const __m256 dmin = kd.mins ? halfx8(p + kd.dmin_offset() + rh * 16) : _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const __m256 da = _mm256_set1_ps(x.d[r * x.d_stride + s]);
    __m256i v = dot[r];
    if constexpr (kd.zero) v = _mm256_sub_epi32(v, _mm256_mullo_epi32(off[r], _mm256_set1_epi32(kd.zero)));
    acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(v), acc[r]);
    if constexpr (kd.mins) acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, da), _mm256_cvtepi32_ps(off[r]), acc[r]);
  }
}

template <int KI, int R>
void tile_avx2(const QuantActs& x, const uint8_t* w, int64_t sbs, float* out, int64_t ldo) {
  constexpr Kind kd = kKinds[KI];
  constexpr int nb = kd.super / kBlock, halves = kBlock / kd.sub, gps = kd.sub / 4, run = run16(kd, gps);
  static_assert(!(kd.zero && kd.mins), "the offset term is either the zero's or the mins'");
  // Halves of the tile per pass: up to 2 rows the registers hold both, and each activation broadcast serves 16
  // rows (one core, M = 1, 2048 x 8192 hot, 2 rounds: IQ4_XS 12 -> 19 GB/s, Q5_K 24 -> 26; Q6_K, Q5_0 unchanged
  // within noise). Per row the arithmetic is the same, so results are too.
  constexpr int H = R <= 2 ? 2 : 1;
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
  // Both halves of a super-block are done before the next one: each cache line is consumed whole while it is
  // fresh, so the hardware prefetcher streams the tile (a sweep per half read the lines half-used, at twice the
  // rate, and left memory idle during the second sweep). acc lives across super-blocks and may spill: it is
  // touched once per super-block.
  __m256 acc[2][R];
  for (int rh = 0; rh < 2; ++rh)
    for (int r = 0; r < R; ++r) acc[rh][r] = _mm256_setzero_ps();
  for (int64_t s = 0; s < sbs; ++s) {
    const uint8_t* p = w + s * kd.tile_bytes();
    for (int rh0 = 0; rh0 < 2; rh0 += H) {  // rows 8 rh0 .. 8 (rh0 + H) - 1 of the tile
      __m256i dot[H][R];  // sum_j sc_j dot_j, int32 per row
      for (int hh = 0; hh < H; ++hh)
        for (int r = 0; r < R; ++r) dot[hh][r] = _mm256_setzero_si256();
      for (int b = 0; b < nb; ++b) {
        prefetch_part<kd.tile_bytes(), 2 * nb / H>(p, rh0 / H * nb + b);
        const uint8_t* c = p + b * kd.code_bytes() + rh0 * 32;
        static_for<0, halves>([&](auto h) {
          __m256i sc16[H];  // (sc, sc) per row
          for (int hh = 0; hh < H; ++hh) {
            const __m128i sc8 = scales8<KI>(p, b * halves + h, rh0 + hh);
            sc16[hh] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc8, sc8));
          }
          static_for<h * gps, (h + 1) * gps, run>([&](auto g0) {
            __m256i s16[H][R];
            for (int hh = 0; hh < H; ++hh)
              for (int r = 0; r < R; ++r) s16[hh][r] = _mm256_setzero_si256();
            static_for<g0, g0 + run>([&](auto g) {
              __m256i q[H], qs[H];
              for (int hh = 0; hh < H; ++hh) {
                q[hh] = group_codes<KI, g>(c + hh * 32);
                // the IQ4 table's signed values v: |v| in q and sign(v) in qs (maddubs: unsigned by signed)
                if constexpr (kd.lut) qs[hh] = _mm256_shuffle_epi8(lut, q[hh]), q[hh] = _mm256_abs_epi8(qs[hh]);
              }
              for (int r = 0; r < R; ++r) {
                const __m256i av = _mm256_set1_epi32(load4(x.a + r * x.a_stride + (s * nb + b) * kBlock + 4 * g));
                for (int hh = 0; hh < H; ++hh) {
                  __m256i a = av;
                  if constexpr (kd.lut) a = _mm256_sign_epi8(av, qs[hh]);
                  s16[hh][r] = _mm256_add_epi16(s16[hh][r], _mm256_maddubs_epi16(q[hh], a));
                  if constexpr (run > 2) keep_in_register(s16[hh][r]);
                }
              }
            });
            for (int hh = 0; hh < H; ++hh)
              for (int r = 0; r < R; ++r)
                dot[hh][r] = _mm256_add_epi32(dot[hh][r], _mm256_madd_epi16(s16[hh][r], sc16[hh]));
          });
        });
      }
      for (int hh = 0; hh < H; ++hh) finish_half<KI, R>(x, p, s, rh0 + hh, dot[hh], acc[rh0 + hh]);
    }
  }
  for (int rh = 0; rh < 2; ++rh)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + rh * 8, acc[rh][r]);
}

// 4-bit codes in sub-blocks of 32, without high bits or a table (Q4_0, Q4_1, Q4_K): a sub-block's 8 groups sum
// in int16 (at most 8 x 2 x 15 x 127), so both halves of the tile go in one pass. Each activation broadcast then
// serves 16 rows and each code load R rows, and a sub-block's int16 sums widen once. The integer sums and the
// float operations are tile_avx2's, so results are the same bit for bit.
template <int KI, int R>
void tile4_avx2(const QuantActs& x, const uint8_t* w, int64_t sbs, float* out, int64_t ldo) {
  constexpr Kind kd = kKinds[KI];
  constexpr int nb = kd.super / kBlock;
  static_assert(kd.sub == kBlock && kd.lo_bits == 4 && !kd.hi_bits && !kd.lut && !kd.nibble_scales);
  static_assert(run16(kd, kBlock / 4) == kBlock / 4, "a sub-block's int16 sums must not overflow");
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[2][R];
  for (int rh = 0; rh < 2; ++rh)
    for (int r = 0; r < R; ++r) acc[rh][r] = _mm256_setzero_ps();
  for (int64_t s = 0; s < sbs; ++s) {
    const uint8_t* p = w + s * kd.tile_bytes();
    __m256i dot[2][R];  // sum_j sc_j dot_j, int32 per row
    for (int rh = 0; rh < 2; ++rh)
      for (int r = 0; r < R; ++r) dot[rh][r] = _mm256_setzero_si256();
    for (int b = 0; b < nb; ++b) {  // sub-block b
      const uint8_t* c = p + b * kd.code_bytes();
      __m256i s16[2][R];
      for (int rh = 0; rh < 2; ++rh)
        for (int r = 0; r < R; ++r) s16[rh][r] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {  // features 8v .. 8v + 7: low nibbles, then high
        prefetch_part<kd.tile_bytes(), 4 * nb>(p, 4 * b + v);
        const __m256i raw[2] = {load256(c + v * 64), load256(c + v * 64 + 32)};
#pragma GCC unroll 2
        for (int nib = 0; nib < 2; ++nib) {
          __m256i q[2];
          for (int rh = 0; rh < 2; ++rh) q[rh] = _mm256_and_si256(nib ? _mm256_srli_epi16(raw[rh], 4) : raw[rh], low);
          for (int r = 0; r < R; ++r) {
            const int8_t* a = x.a + r * x.a_stride + (s * nb + b) * kBlock + 4 * (2 * v + nib);
            const __m256i av = _mm256_set1_epi32(load4(a));
            for (int rh = 0; rh < 2; ++rh) {
              s16[rh][r] = _mm256_add_epi16(s16[rh][r], _mm256_maddubs_epi16(q[rh], av));
              keep_in_register(s16[rh][r]);
            }
          }
        }
      }
      for (int rh = 0; rh < 2; ++rh) {
        const __m128i sc8 = scales8<KI>(p, b, rh);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc8, sc8));  // (sc, sc) per row
        for (int r = 0; r < R; ++r) dot[rh][r] = _mm256_add_epi32(dot[rh][r], _mm256_madd_epi16(s16[rh][r], sc16));
      }
    }
    for (int rh = 0; rh < 2; ++rh) finish_half<KI, R>(x, p, s, rh, dot[rh], acc[rh]);
  }
  for (int rh = 0; rh < 2; ++rh)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + rh * 8, acc[rh][r]);
}

}  // namespace

template <int KI>
void gemm(const QuantActs& x, int64_t m, const uint8_t* w, int64_t n, int64_t k, float* out, bool vnni) {
  constexpr Kind kd = kKinds[KI];
  const int64_t sbs = k / kd.super, stride = sbs * kd.tile_bytes();
  if constexpr (kd.super == kBlock && kd.lo_bits == 4 && kd.hi_bits == 0 && !kd.scales) {
    auto tile = [&](int64_t t, auto NT, const QuantActs& xr, auto R, float* dst, int64_t ldo) {
      tile32_vnni<KI, R(), NT()>(xr, w + t * stride, stride, sbs, dst, ldo);
    };
    // Two tiles per call, decode steps included: two weight streams per core, and each broadcast activation
    // serves both (Xeon VM, AVX-512 VNNI, 2 threads, bare decode steps, 3 alternating rounds against one tile at
    // a time: default model (Q4_1) batch 1 6.4-7.1 -> 5.6-6.5 ms, batch 4 10.7-11.6 -> 9.7-10.2 ms; 1B Q4_0
    // batch 1 35-36 -> 31-32 ms, batch 4 50-51 -> 42-44 ms. An earlier VNNI machine had measured one tile at a
    // time faster for decode.) The sums of each tile are the same either way, so results are too.
    if (vnni) return run_tiles<kVnniRows, kVnniTiles>(x, m, n, k / kBlock, out, tile);
  }
  // Codes with high-bit planes and sub-block scales but no mins (Q3_K, Q6_K): their unpacking costs most and the
  // registers hold 8 rows, so each tile-block serves 8 (4096 x 4096 x 128 rows: Q6_K 18.0 -> 16.3 ms, Q3_K 17.3 ->
  // 16.0; for the other types 8 rows were no faster).
  constexpr int vnni_rows = kd.hi_bits && kd.scales && !kd.mins ? 2 * kVnniRows : kVnniRows;
  // AVX2: 4-bit codes in sub-blocks of 32 go both halves at a time, 5 rows per pass (one core, 1024 x 2048 in cache,
  // Q4_0 / Q4_1 against tile_avx2 at 4 / 8 rows: 4 rows +50-70%, 16 rows +60-65%, 1 row +15%; Q4_K against 8 rows:
  // 5 / 16 rows +20-25%; 5 rows against 4 +3-10%, 6 no better; 2 threads, 512-token prefill: default model (Q4_1)
  // 690-730 -> 1040-1100 tok/s, 1B Q4_0 96 -> 156-169).
  constexpr bool avx2_tile4 = kd.sub == kBlock && kd.lo_bits == 4 && !kd.hi_bits && !kd.lut && !kd.nibble_scales;
  // The other kinds: 4 rows per pass, Q6_K's two code planes 5 (one core, 1024 x 2048 in cache, against 4: 5 rows
  // 46 -> 54-56 GMAC/s, 64 rows +2-12%, 16 rows +1-3%; 6 rows no better than 5).
  constexpr int avx2_rows = kd.hi_bits == 2 ? kAvx2Rows + 1 : kAvx2Rows;
  auto vnni_tile = [&](int64_t t, auto NT, const QuantActs& xr, auto R, float* dst, int64_t ldo) {
    tile_vnni<KI, R(), NT()>(xr, w + t * stride, stride, sbs, dst, ldo);
  };
  if (vnni && m <= kVnniPairRows) run_tiles<kVnniPairRows, 2>(x, m, n, k / kBlock, out, vnni_tile);
  else if (vnni) run_tiles<vnni_rows, 1>(x, m, n, k / kBlock, out, vnni_tile);
  else if constexpr (avx2_tile4)
    run_tiles<kTile4Rows, 1>(x, m, n, k / kBlock, out, [&](int64_t t, auto, const QuantActs& xr, auto R, float* dst,
                                                            int64_t ldo) { tile4_avx2<KI, R()>(xr, w + t * stride, sbs, dst, ldo); });
  else
    run_tiles<avx2_rows, 1>(x, m, n, k / kBlock, out, [&](int64_t t, auto, const QuantActs& xr, auto R, float* dst,
                                                          int64_t ldo) { tile_avx2<KI, R()>(xr, w + t * stride, sbs, dst, ldo); });
}

void linear_rows(const float* x, int64_t m, int64_t k, const at::Tensor& packed, int64_t type, int64_t n, float* y,
                 ActScratch& scratch) {
  if (m == 0) return;
  const Kind& kd = kind_of(type, "ggml::linear_rows");
  const int64_t sbs = k / kd.super, subs = k / kd.sub;
  QuantActs acts = quantize_acts_into(x, m, k, kd.super, sbs, false, 0, scratch.a(m, k), scratch.d(m * sbs), nullptr);
  int16_t* is = scratch.isum(m * subs);
  float* fs = scratch.fsum(m * subs);
  at::parallel_for(0, m, std::max<int64_t>(1, (int64_t{1} << 16) / k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)  // |is| <= 32 * 127
      for (int64_t j = 0; j < subs; ++j) {
        const int8_t* a = acts.a + r * acts.a_stride + j * kd.sub;
        int32_t sum = 0;
        for (int e = 0; e < kd.sub; ++e) sum += a[e];
        is[r * subs + j] = static_cast<int16_t>(sum);
        fs[r * subs + j] = static_cast<float>(sum);
      }
  });
  acts.isum = is, acts.fsum = fs, acts.isum_stride = subs;
  if (m >= kAmxMinRows && use_amx() && amx_gemm(type, acts, m, packed.data_ptr<uint8_t>(), n, k, y)) return;
  with_kind(type, [&](auto KI) { gemm<KI()>(acts, m, packed.data_ptr<uint8_t>(), n, k, y, use_vnni()); });
}

}  // namespace flashgen::cpu::quant::ggml
