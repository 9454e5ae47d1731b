// Host-side launch planning shared by the forward and backward launchers: vector width, row-group size,
// tiles per row.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace fused_ensemble::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements per 16-byte vector load of x [N, R, K] when every member row starts 16-byte aligned and the class
// dim is contiguous; 1 (strided scalar loads) otherwise.
inline int vector_width(const at::Tensor& x) {
  const int64_t v = 16 / x.element_size();
  const int64_t N = x.size(0), R = x.size(1), K = x.size(2);
  const bool ok = K % v == 0 && x.stride(2) == 1 && (N == 1 || x.stride(0) % v == 0) &&
                  (R == 1 || x.stride(1) % v == 0) && aligned16(x.data_ptr());
  return ok ? static_cast<int>(v) : 1;
}

// How a row of K columns is spread over threads. A thread holds E elements of a tile in registers (NV = E / vec
// vectors); `tpr` threads share a row; a row longer than tpr * E columns is processed in `tiles` tiles.
struct RowConfig {
  int E;
  int tpr;
  int block;
  int rows_per_block;
  int tiles;
};

// small_e / large_e: elements per thread of the two compiled variants. Short rows (up to 32 * small_e)
// use the smallest power-of-two sub-warp that covers them (K = 10 -> 2 threads per row, 128 rows per
// 256-thread block); longer rows use large_e with a warp, or a whole block of up to max_block threads.
inline RowConfig choose_row_config(int64_t K, int vec, int small_e, int large_e, int max_block) {
  const int64_t vectors = ceil_div(K, vec);
  RowConfig c;
  int64_t need;
  if (vectors <= 32 * (small_e / vec)) {
    c.E = small_e;
    need = ceil_div(vectors, small_e / vec);
  } else {
    c.E = large_e;
    need = std::min<int64_t>(ceil_div(vectors, large_e / vec), max_block);
  }
  int64_t tpr = 1;
  while (tpr < need) tpr <<= 1;
  c.tpr = static_cast<int>(tpr);
  if (c.tpr <= 32) {
    c.block = 256;
    c.rows_per_block = 256 / c.tpr;
  } else {
    c.block = c.tpr;
    c.rows_per_block = 1;
  }
  c.tiles = static_cast<int>(ceil_div(vectors, static_cast<int64_t>(c.tpr) * (c.E / vec)));
  return c;
}

// Halves the rows per block of a sub-warp configuration (down to one warp) until bytes_per_row * rows fits
// the budget; returns false when even one warp's rows do not fit.
inline bool shrink_to_fit(RowConfig& c, int64_t bytes_per_row, int64_t budget) {
  while (c.rows_per_block * bytes_per_row > budget) {
    if (c.tpr > 32 || c.block <= 32) return false;
    c.block /= 2;
    c.rows_per_block /= 2;
  }
  return true;
}

}  // namespace fused_ensemble::cuda
