// The drivers of the quantized GEMM tile kernels (quant_kernels.cpp, ggml_kernels.cpp): output features in
// tiles of 16 rows, activation rows R at a time, threads sharing the tiles out.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/parallel.h"
#include "cpu/quant.h"

namespace flashgen::cpu::quant {

constexpr int64_t kRowChunk = 64;  // rows whose int8 activations stay in L2 while all tiles stream past
constexpr int64_t kMinTask = int64_t{1} << 18;  // multiply-adds per thread task (smaller work stays on one thread)
constexpr int64_t kMinItem = int64_t{1} << 21;  // multiply-adds per work item taken in turn (see run_tiles)
constexpr int64_t kItemsPerThread = 4;  // items per thread of a decode step's tiles (see run_tiles)

// A tile kernel asks for the weight bytes it reads kPrefetchAhead bytes before it reads them: with the hardware
// prefetcher alone, one core streamed a GEMV's weights at half its read bandwidth (AVX2, M = 1: Q4_K 8.5 GB/s
// against 16.5 for a plain sum). The requests are spread over the tile's work, a few lines at a time: asked all at
// once per tile-block they fill the core's miss buffers, and the demand loads behind them wait (AVX2, M = 1, cold
// 2048 x 8192, one core: Q4_K 9-10.5 -> 13-14.5 GB/s, Q6_K 7-10 -> 12-15; two cores 14-17 -> 20-24).
constexpr int64_t kPrefetchAhead = 4096;
inline void prefetch_line(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchAhead, _MM_HINT_T0);
}
// The lines that start in piece `part` of `Parts` equal pieces of the Bytes at p: over all parts, each line of the
// Bytes once.
template <int64_t Bytes, int64_t Parts>
inline void prefetch_part(const uint8_t* p, int64_t part) {
  constexpr int64_t piece = (Bytes + Parts - 1) / Parts;
  for (int64_t i = (part * piece + 63) / 64 * 64; i < std::min(Bytes, (part + 1) * piece); i += 64) prefetch_line(p + i);
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// f(std::integral_constant<int, rows>) for 1 <= rows <= MaxR.
template <int MaxR, class F>
void with_rows(int rows, F&& f) {
  if constexpr (MaxR > 1)
    if (rows < MaxR) return with_rows<MaxR - 1>(rows, f);
  f(std::integral_constant<int, MaxR>{});
}

inline QuantActs offset(const QuantActs& x, int64_t row) {
  QuantActs y = x;
  y.a += row * x.a_stride;
  y.d += row * x.d_stride;
  if (x.xsum) y.xsum += row * x.xsum_stride;
  if (x.isum) y.isum += row * x.isum_stride;
  if (x.fsum) y.fsum += row * x.isum_stride;
  return y;
}

// Kernels of more rows per call than this take the row count as an int (AMX, whose rows are tile rows, not
// registers); the others as a compile-time constant.
constexpr int kStaticRows = 16;

// Tiles [t0, t1) (output features) for rows [m0, m1), C at a time (t0 a multiple of C): tile(t, NT, x_rows, R,
// dst, ld) writes the R x 16 NT outputs of tiles t .. t + NT - 1 to dst with row stride ld (NT < C only at the
// end of the matrix).
template <int MaxR, int C, class Tile>
void tile_span(const QuantActs& x, int64_t m0, int64_t m1, int64_t t0, int64_t t1, int64_t n, float* out,
               Tile& tile) {
  alignas(64) float buf[MaxR * C * kTileRows];
  for (int64_t t = t0; t < t1; t += C) {
    const int nt = static_cast<int>(std::min<int64_t>(C, t1 - t));
    const int64_t cols = std::min(nt * kTileRows, n - t * kTileRows);
    for (int64_t r0 = m0; r0 < m1; r0 += MaxR) {
      const int rows = static_cast<int>(std::min<int64_t>(MaxR, m1 - r0));
      float* dst = out + r0 * n + t * kTileRows;
      with_rows<C>(nt, [&](auto NT) {
        auto run = [&](auto R) {
          if (cols == NT * kTileRows) {  // whole tiles: straight into the output rows
            tile(t, NT, offset(x, r0), R, dst, n);
            return;
          }
          tile(t, NT, offset(x, r0), R, buf, NT * kTileRows);
          for (int r = 0; r < rows; ++r) std::memcpy(dst + r * n, buf + r * NT * kTileRows, cols * sizeof(float));
        };
        if constexpr (MaxR > kStaticRows) run(rows);
        else with_rows<MaxR>(rows, run);
      });
    }
  }
}

// Up to kRowChunk rows (a decode step, a short prompt): the threads split the tiles evenly, once. More rows:
// the work is cut into items of kRowChunk rows (whose int8 activations stay in L2 while tiles stream past)
// x a few tiles, which the threads take in turn (parallel.h), row chunk by row chunk.
template <int MaxR, int C, class Tile>
void run_tiles(const QuantActs& x, int64_t m, int64_t n, int64_t kb, float* out, Tile&& tile) {
  const int64_t n_tiles = tiles(n), tile_work = kTileRows * kb * kBlock;  // multiply-adds per row per tile
  const int64_t units = (n_tiles + C - 1) / C;
  if (m <= kRowChunk) {
    const int64_t grain = std::max<int64_t>(1, kMinTask / (m * C * tile_work));
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), (units + grain - 1) / grain);
    const int64_t items = std::min<int64_t>(units, threads * kItemsPerThread), per = (units + items - 1) / items;
    in_turn(threads, [&](auto take) {
      for (int64_t i = take(); i * per < units; i = take())
        tile_span<MaxR, C>(x, 0, m, i * per * C, std::min(n_tiles, (i + 1) * per * C), n, out, tile);
    });
    return;
  }
  const int64_t per_item = C * std::clamp<int64_t>(kMinItem / (kRowChunk * C * tile_work), 1, units);
  const int64_t row_items = (n_tiles + per_item - 1) / per_item, items = (m + kRowChunk - 1) / kRowChunk * row_items;
  in_turn(items, [&](auto take) {
    for (int64_t i = take(); i < items; i = take()) {
      const int64_t m0 = i / row_items * kRowChunk, t0 = i % row_items * per_item;
      tile_span<MaxR, C>(x, m0, std::min(m, m0 + kRowChunk), t0, std::min(n_tiles, t0 + per_item), n, out, tile);
    }
  });
}

}  // namespace flashgen::cpu::quant
