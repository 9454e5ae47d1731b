// Row kernels of the ensemble reduction, written once with at::vec::Vectorized and compiled once per CPU
// capability. Include only through kernel_table_impl.h from a kernels_<capability>.cpp, which defines CPU_CAPABILITY
// (and CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 with the matching `#pragma GCC target`) before at::vec is
// included.
//
// Every function works on one row r at a time: the N member rows x[n, r, :] are turned into contiguous "acc"
// rows (float, or double for double logits) -- used in place when they already are, converted into a per-thread
// buffer otherwise -- and all later passes over a member row read it from cache, so memory sees each member row
// once. No std containers here: their out-of-line copies would be shared between the per-capability builds.
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "reduce_kernels.h"

namespace fused_ensemble::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// exp with Sleef's 1-ulp implementation: the 20-ulp polynomial (exp_u20) is not faster enough here to justify
// its error, and it maps NaN to a finite value.
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& v) {
  return v.exp();
}

template <typename T>
inline Vectorized<T> load_tail(const T* p, int64_t count, T fill) {
  return Vectorized<T>::set(Vectorized<T>(fill), Vectorized<T>::loadu(p, count), count);
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T sum = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) sum += lanes[i];
  return sum;
}

// max that returns NaN if either side is NaN, like torch.max.
template <typename T>
inline T nan_max(T a, T b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a > b ? a : b;
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T best = lanes[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i) best = nan_max(best, lanes[i]);
  return best;
}

// Max of a row, NaN if the row has a NaN.
template <typename T>
T row_max(const T* p, int64_t K) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V m0(-kInf<T>), m1(-kInf<T>);
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W) {
    m0 = at::vec::maximum(m0, V::loadu(p + k));
    m1 = at::vec::maximum(m1, V::loadu(p + k + W));
  }
  for (; k + W <= K; k += W) m0 = at::vec::maximum(m0, V::loadu(p + k));
  if (k < K) m0 = at::vec::maximum(m0, load_tail(p + k, K - k, -kInf<T>));
  return hmax(at::vec::maximum(m0, m1));
}

// First index k with p[k] == value (value taken from the row, so it exists); for NaN, the first NaN. This is
// torch.argmax's tie rule.
template <typename T>
int64_t first_index_of(const T* p, int64_t K, T value) {
  if (std::isnan(value)) {
    for (int64_t k = 0; k < K; ++k)
      if (std::isnan(p[k])) return k;
    return 0;
  }
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  constexpr int no_lane_matches = (1 << W) - 1;  // zero_mask() has a bit per lane that compares false
  const V target(value);
  int64_t k = 0;
  for (; k + W <= K; k += W)
    if ((V::loadu(p + k) == target).zero_mask() != no_lane_matches) break;
  for (; k < K; ++k)
    if (p[k] == value) return k;
  return 0;
}

// e[k] = exp(p[k] - shift); returns sum_k e[k].
template <typename T>
T exp_store_sum(const T* p, T shift, T* e, int64_t K) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vshift(shift);
  V sum(0);
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V v = vexp(V::loadu(p + k) - vshift);
    v.store(e + k);
    sum += v;
  }
  if (k < K) {
    const int64_t count = K - k;
    V v = vexp(V::loadu(p + k, count) - vshift);
    v.store(e + k, count);
    sum += V::set(V(0), v, count);
  }
  return hsum(sum);
}

// sum_k exp(p[k] - shift).
template <typename T>
T exp_sum(const T* p, T shift, int64_t K) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vshift(shift);
  V sum(0);
  int64_t k = 0;
  for (; k + W <= K; k += W) sum += vexp(V::loadu(p + k) - vshift);
  if (k < K) sum += V::set(V(0), vexp(V::loadu(p + k, K - k) - vshift), K - k);
  return hsum(sum);
}

// e[k] = exp(p[k] - shift); returns {sum_k e[k], sum_k e[k] * (p[k] - shift)} with 0 * -inf taken as 0.
template <typename T>
void exp_store_sum_dot(const T* p, T shift, T* e, int64_t K, T& sum_out, T& dot_out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vshift(shift), zero(0);
  V sum(0), dot(0);
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V d = V::loadu(p + k) - vshift;
    V v = vexp(d);
    v.store(e + k);
    sum += v;
    dot += V::blendv(zero, v * d, v > zero);
  }
  if (k < K) {
    const int64_t count = K - k;
    V d = V::loadu(p + k, count) - vshift;
    V v = V::set(zero, vexp(d), count);
    v.store(e + k, count);
    sum += v;
    dot += V::blendv(zero, v * d, v > zero);
  }
  sum_out = hsum(sum);
  dot_out = hsum(dot);
}

// o[k] = (accumulate ? o[k] : 0) + e[k] * scale.
template <typename T>
void scale_add(const T* e, T scale, T* o, int64_t K, bool accumulate) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vscale(scale);
  int64_t k = 0;
  if (accumulate) {
    for (; k + W <= K; k += W) (V::loadu(o + k) + V::loadu(e + k) * vscale).store(o + k);
    if (k < K) (V::loadu(o + k, K - k) + V::loadu(e + k, K - k) * vscale).store(o + k, K - k);
  } else {
    for (; k + W <= K; k += W) (V::loadu(e + k) * vscale).store(o + k);
    if (k < K) (V::loadu(e + k, K - k) * vscale).store(o + k, K - k);
  }
}

template <typename T>
T dot(const T* a, const T* b, int64_t K) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc(0);
  int64_t k = 0;
  for (; k + W <= K; k += W) acc += V::loadu(a + k) * V::loadu(b + k);
  if (k < K) acc += V::loadu(a + k, K - k) * V::loadu(b + k, K - k);  // loadu zero-fills the rest
  return hsum(acc);
}

// The scalar statistics of a row, from its mean probabilities' max (`confidence`, NaN-propagating), their entropy, the
// sum of the member entropies and the number of members whose own argmax is not the prediction. A row in which some
// member has no softmax (a NaN or +inf logit, or -inf everywhere) has NaN probabilities everywhere, hence a NaN
// confidence: every statistic of it is NaN (the reference's rule; its prediction, the first NaN, is 0). The mutual
// information is never negative: a rounding below 0 is 0.
template <typename acc_t>
inline void store_row_stats(const StatsArgs& a, int64_t r, acc_t confidence, int64_t prediction, acc_t entropy,
                            acc_t entropy_sum, int64_t disagree) {
  const acc_t members = static_cast<acc_t>(a.x.members);
  const bool undefined = std::isnan(confidence);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t expected_entropy = undefined ? nan : entropy_sum / members;
  entropy = undefined ? nan : entropy;
  const acc_t mutual_info = entropy - expected_entropy;
  static_cast<acc_t*>(a.entropy)[r] = entropy;
  static_cast<acc_t*>(a.expected_entropy)[r] = expected_entropy;
  static_cast<acc_t*>(a.mutual_info)[r] = mutual_info < acc_t(0) ? acc_t(0) : mutual_info;  // NaN stays NaN
  static_cast<acc_t*>(a.confidence)[r] = confidence;
  a.prediction[r] = prediction;
  static_cast<acc_t*>(a.disagreement)[r] = undefined ? nan : static_cast<acc_t>(disagree) / members;
}

// -sum_k p log p with 0 log 0 = 0 (torch.special.xlogy).
template <typename T>
T neg_xlogx_sum(const T* p, int64_t K) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V zero(0);
  V acc(0);
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V v = V::loadu(p + k);
    acc += V::blendv(v * v.log(), zero, v == zero);
  }
  if (k < K) {
    V v = load_tail(p + k, K - k, T(0));
    acc += V::blendv(v * v.log(), zero, v == zero);
  }
  return -hsum(acc);
}

// o[k] = mean_n rows[n][k].
template <typename T>
void mean_of_rows(const T* const* rows, int64_t N, int64_t K, T* o) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V count(static_cast<T>(N));
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V acc = V::loadu(rows[0] + k);
    for (int64_t n = 1; n < N; ++n) acc += V::loadu(rows[n] + k);
    (acc / count).store(o + k);
  }
  if (k < K) {
    const int64_t rest = K - k;
    V acc = V::loadu(rows[0] + k, rest);
    for (int64_t n = 1; n < N; ++n) acc += V::loadu(rows[n] + k, rest);
    (acc / count).store(o + k, rest);
  }
}

// out[i] = mean_n x[n, i] over flat elements [begin, end) of logits whose [R, K] block is contiguous in each
// member, in chunks that stay in L1 (converted chunk by chunk for half/bfloat16 logits).
template <typename scalar_t, typename acc_t>
void mean_flat_range(const ForwardArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t kChunk = 2048;
  const int64_t N = a.x.members;
  const scalar_t* x = static_cast<const scalar_t*>(a.x.data);
  acc_t* out = static_cast<acc_t*>(a.out);
  std::unique_ptr<const acc_t*[]> rows(new const acc_t*[N]);
  std::unique_ptr<acc_t[]> buffer(std::is_same_v<scalar_t, acc_t> ? nullptr : new acc_t[N * kChunk]);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t len = std::min(kChunk, end - i);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* src = x + n * a.x.stride_member + i;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        rows[n] = src;
      } else {
        at::vec::convert(src, buffer.get() + n * kChunk, len);
        rows[n] = buffer.get() + n * kChunk;
      }
    }
    mean_of_rows(rows.get(), N, len, out + i);
  }
}

// Softmax of a row in place.
template <typename T>
void softmax_in_place(T* o, int64_t K) {
  const T m = row_max(o, K);
  const T sum = exp_store_sum(o, m, o, K);
  scale_add(o, T(1) / sum, o, K, /*accumulate=*/false);
}

// Gives each member row of one logits row as contiguous acc_t values: a pointer into the logits when they
// already are acc_t with unit class stride, otherwise a converted copy in buffer slot `slot`.
template <typename scalar_t, typename acc_t>
class MemberRows {
 public:
  MemberRows(const LogitsView& x, int64_t slots)
      : x_(x),
        in_place_(std::is_same_v<scalar_t, acc_t> && x.stride_class == 1),
        buffer_(in_place_ ? nullptr : new acc_t[slots * x.classes]) {}

  const acc_t* get(int64_t n, int64_t r, int64_t slot) {
    const scalar_t* src = static_cast<const scalar_t*>(x_.data) + n * x_.stride_member + r * x_.stride_row;
    if (in_place_) return reinterpret_cast<const acc_t*>(src);
    acc_t* dst = buffer_.get() + slot * x_.classes;
    if (x_.stride_class == 1) {
      at::vec::convert(src, dst, x_.classes);
    } else {
      for (int64_t k = 0; k < x_.classes; ++k) dst[k] = static_cast<acc_t>(src[k * x_.stride_class]);
    }
    return dst;
  }

 private:
  const LogitsView& x_;
  const bool in_place_;
  std::unique_ptr<acc_t[]> buffer_;
};

// Writes an acc_t row to a row of the output dtype.
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t K) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (src != dst) at::vec::convert(src, dst, K);
  } else {
    at::vec::convert(src, dst, K);
  }
}

// Rows of at most this many classes take the short-row paths (softmax_of_mean, mean_probs, log_mean_probs,
// statistics).
constexpr int64_t kShortRowClasses = 16;

// Member n's rows [r0, r0 + rows) as a transposed tile: tile[k * W + i] = x[n, r0 + i, k] in acc_t, lanes past
// `rows` zero (any strides; the short-row kernels' one gather per member and block of rows).
template <typename scalar_t, typename acc_t, int64_t W>
inline void load_tile(const LogitsView& x, int64_t n, int64_t r0, int64_t rows, acc_t* __restrict__ tile) {
  // Strides in locals: read through `x` inside the loop, they would be reloaded after every store to the tile.
  const int64_t K = x.classes, stride_row = x.stride_row, stride_class = x.stride_class;
  const scalar_t* base = static_cast<const scalar_t*>(x.data) + n * x.stride_member + r0 * stride_row;
  for (int64_t i = 0; i < W; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      tile[k * W + i] = i < rows ? static_cast<acc_t>(base[i * stride_row + k * stride_class]) : acc_t(0);
    }
  }
}

// The first `rows` lanes of a transposed tile back into rows [r0, r0 + rows) of a contiguous [R, K] output.
template <typename acc_t, int64_t W>
inline void store_tile(const acc_t* __restrict__ tile, int64_t r0, int64_t rows, int64_t K, acc_t* __restrict__ out) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < K; ++k) out[(r0 + i) * K + k] = tile[k * W + i];
  }
}

// The first `rows` lanes of a member's row max and sum of exp(x - max) into the aux saved for backward ([2, N, R]):
// `aux_max` points at aux[0, n, r0], `aux_sum` at aux[1, n, r0].
template <typename acc_t, int64_t W>
inline void store_member_softmax(const Vectorized<acc_t>& max, const Vectorized<acc_t>& sum, acc_t* aux_max,
                                 acc_t* aux_sum, int64_t rows) {
  alignas(64) acc_t lanes[W];
  max.store(lanes);
  for (int64_t i = 0; i < rows; ++i) aux_max[i] = lanes[i];
  sum.store(lanes);
  for (int64_t i = 0; i < rows; ++i) aux_sum[i] = lanes[i];
}

// mean_probs for short rows (K <= kShortRowClasses), W rows at a time: each member's [W rows x K] tile is
// transposed into K vectors across the rows, so the max, the exps and the sums of W rows run as K vector ops.
// Row by row, a row of 10 classes is one vector and a tail per member, and the per-row overhead dominated
// (16 x 1024 x 10: 0.41 ms, eager 1.05). Same arithmetic as the row path: o = sum_n e_n / (N * sum_n).
template <typename scalar_t, typename acc_t>
void mean_probs_short_rows(const ForwardArgs& a, int64_t row_begin, int64_t row_end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t N = a.x.members, R = a.x.rows, K = a.x.classes;
  acc_t* out = static_cast<acc_t*>(a.out);
  acc_t* aux = static_cast<acc_t*>(a.aux);
  const V neg_inf(-kInf<acc_t>), n_members(static_cast<acc_t>(N));
  alignas(64) acc_t tile[kShortRowClasses * W];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
    const int64_t rows = std::min<int64_t>(W, row_end - r0);
    V acc[kShortRowClasses];
    for (int64_t k = 0; k < K; ++k) acc[k] = V(0);
    for (int64_t n = 0; n < N; ++n) {
      load_tile<scalar_t, acc_t, W>(a.x, n, r0, rows, tile);
      V v[kShortRowClasses];
      V m = neg_inf;
      for (int64_t k = 0; k < K; ++k) {
        v[k] = V::loadu(tile + k * W);
        m = at::vec::maximum(m, v[k]);
      }
      V sum(0);
      for (int64_t k = 0; k < K; ++k) {
        v[k] = vexp(v[k] - m);
        sum += v[k];
      }
      const V scale = V(1) / (n_members * sum);
      for (int64_t k = 0; k < K; ++k) acc[k] += v[k] * scale;
      store_member_softmax<acc_t, W>(m, sum, aux + n * R + r0, aux + (N + n) * R + r0, rows);
    }
    for (int64_t k = 0; k < K; ++k) acc[k].store(tile + k * W);
    store_tile<acc_t, W>(tile, r0, rows, K, out);
  }
}

// log_mean_probs for short rows, W rows at a time as mean_probs_short_rows: every member's tile is transposed
// once into a per-thread buffer, then the row path's arithmetic runs on vectors across the rows: per member the
// max and log-sum-exp, per class top = max_n log_softmax_n and log sum_n exp(log_softmax_n - top).
template <typename scalar_t, typename acc_t>
void log_mean_probs_short_rows(const ForwardArgs& a, int64_t row_begin, int64_t row_end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t N = a.x.members, R = a.x.rows, K = a.x.classes;
  acc_t* out = static_cast<acc_t*>(a.out);
  acc_t* aux = static_cast<acc_t*>(a.aux);
  const V neg_inf(-kInf<acc_t>), zero(0), log_n(std::log(static_cast<acc_t>(N)));
  std::unique_ptr<acc_t[]> tiles(new acc_t[N * K * W]);  // member n, class k: W rows at tiles + (n * K + k) * W
  std::unique_ptr<acc_t[]> shifts(new acc_t[2 * N * W]);  // member max, then member log-sum-exp - max
  alignas(64) acc_t lanes[W];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
    const int64_t rows = std::min<int64_t>(W, row_end - r0);
    for (int64_t n = 0; n < N; ++n) {
      acc_t* tile = tiles.get() + n * K * W;
      load_tile<scalar_t, acc_t, W>(a.x, n, r0, rows, tile);
      V m = neg_inf;
      for (int64_t k = 0; k < K; ++k) m = at::vec::maximum(m, V::loadu(tile + k * W));
      V sum(0);
      for (int64_t k = 0; k < K; ++k) sum += vexp(V::loadu(tile + k * W) - m);
      const V log_sum = sum.log();
      m.store(shifts.get() + n * W);
      log_sum.store(shifts.get() + (N + n) * W);
      store_member_softmax<acc_t, W>(m, sum, aux + n * R + r0, aux + (N + n) * R + r0, rows);
    }
    for (int64_t k = 0; k < K; ++k) {
      V top = neg_inf;
      for (int64_t n = 0; n < N; ++n) {
        const V log_p = (V::loadu(tiles.get() + (n * K + k) * W) - V::loadu(shifts.get() + n * W)) -
                        V::loadu(shifts.get() + (N + n) * W);
        top = at::vec::maximum(top, log_p);
      }
      top = V::blendv(top, zero, top == neg_inf);  // every member at -inf: the sum below is 0, log gives -inf
      V sum(0);
      for (int64_t n = 0; n < N; ++n) {
        sum += vexp((V::loadu(tiles.get() + (n * K + k) * W) - V::loadu(shifts.get() + n * W)) -
                    V::loadu(shifts.get() + (N + n) * W) - top);
      }
      (top + sum.log() - log_n).store(lanes);
      for (int64_t i = 0; i < rows; ++i) out[(r0 + i) * K + k] = lanes[i];
    }
  }
}

// softmax_of_mean for short rows, W rows at a time: the member tiles summed into K vectors across the rows, then
// the row path's softmax (max, exp, sum, scale) on those vectors.
template <typename scalar_t, typename acc_t>
void softmax_of_mean_short_rows(const ForwardArgs& a, int64_t row_begin, int64_t row_end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t N = a.x.members, K = a.x.classes;
  acc_t* out = static_cast<acc_t*>(a.out);
  const V neg_inf(-kInf<acc_t>), n_members(static_cast<acc_t>(N));
  alignas(64) acc_t tile[kShortRowClasses * W];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
    const int64_t rows = std::min<int64_t>(W, row_end - r0);
    V mean[kShortRowClasses];
    for (int64_t n = 0; n < N; ++n) {
      load_tile<scalar_t, acc_t, W>(a.x, n, r0, rows, tile);
      for (int64_t k = 0; k < K; ++k) mean[k] = n == 0 ? V::loadu(tile + k * W) : mean[k] + V::loadu(tile + k * W);
    }
    V m = neg_inf;
    for (int64_t k = 0; k < K; ++k) {
      mean[k] = mean[k] / n_members;
      m = at::vec::maximum(m, mean[k]);
    }
    V sum(0);
    for (int64_t k = 0; k < K; ++k) {
      mean[k] = vexp(mean[k] - m);
      sum += mean[k];
    }
    const V scale = V(1) / sum;
    for (int64_t k = 0; k < K; ++k) (mean[k] * scale).store(tile + k * W);
    store_tile<acc_t, W>(tile, r0, rows, K, out);
  }
}

template <typename scalar_t, typename acc_t>
void reduce_forward_rows(const ForwardArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.reduction == Reduction::kSoftmaxOfMean && a.x.classes <= kShortRowClasses) {
    return softmax_of_mean_short_rows<scalar_t, acc_t>(a, row_begin, row_end);
  }
  if (a.reduction == Reduction::kMeanProbs && a.x.classes <= kShortRowClasses) {
    return mean_probs_short_rows<scalar_t, acc_t>(a, row_begin, row_end);
  }
  if (a.reduction == Reduction::kLogMeanProbs && a.x.classes <= kShortRowClasses) {
    return log_mean_probs_short_rows<scalar_t, acc_t>(a, row_begin, row_end);
  }
  const int64_t N = a.x.members, R = a.x.rows, K = a.x.classes;
  acc_t* out = static_cast<acc_t*>(a.out);
  acc_t* aux = static_cast<acc_t*>(a.aux);
  const bool all_rows_at_once = a.reduction == Reduction::kMean || a.reduction == Reduction::kSoftmaxOfMean ||
                                a.reduction == Reduction::kLogMeanProbs;
  MemberRows<scalar_t, acc_t> members(a.x, all_rows_at_once ? N : 1);
  std::unique_ptr<const acc_t*[]> rows(new const acc_t*[N]);
  std::unique_ptr<acc_t[]> shift(new acc_t[2 * N]);  // kLogMeanProbs: member max, then member log-sum-exp - max
  std::unique_ptr<acc_t[]> exps(a.reduction == Reduction::kMeanProbs ? new acc_t[K] : nullptr);
  const acc_t log_n = std::log(static_cast<acc_t>(N));

  for (int64_t r = row_begin; r < row_end; ++r) {
    acc_t* o = out + r * K;
    switch (a.reduction) {
      case Reduction::kMean:
      case Reduction::kSoftmaxOfMean:
        for (int64_t n = 0; n < N; ++n) rows[n] = members.get(n, r, n);
        mean_of_rows(rows.get(), N, K, o);
        if (a.reduction == Reduction::kSoftmaxOfMean) softmax_in_place(o, K);
        break;
      case Reduction::kMeanProbs:
        for (int64_t n = 0; n < N; ++n) {
          const acc_t* p = members.get(n, r, 0);
          const acc_t m = row_max(p, K);
          const acc_t sum = exp_store_sum(p, m, exps.get(), K);
          aux[n * R + r] = m;
          aux[(N + n) * R + r] = sum;
          scale_add(exps.get(), acc_t(1) / (static_cast<acc_t>(N) * sum), o, K, /*accumulate=*/n > 0);
        }
        break;
      case Reduction::kLogMeanProbs: {
        acc_t* max = shift.get();
        acc_t* log_sum = shift.get() + N;
        for (int64_t n = 0; n < N; ++n) {
          rows[n] = members.get(n, r, n);
          max[n] = row_max(rows[n], K);
          const acc_t sum = exp_sum(rows[n], max[n], K);
          log_sum[n] = std::log(sum);
          aux[n * R + r] = max[n];
          aux[(N + n) * R + r] = sum;
        }
        // out_k = logsumexp_n(log_softmax_n,k) - log N; the log-softmax is formed as (x - max) - log_sum so
        // that large logits lose nothing to the rounding of the log-sum-exp.
        using V = Vectorized<acc_t>;
        constexpr int64_t W = V::size();
        const V neg_inf(-kInf<acc_t>), zero(0), vlog_n(log_n);
        for (int64_t k = 0; k < K; k += W) {
          const int64_t count = std::min<int64_t>(W, K - k);
          V top = neg_inf;
          for (int64_t n = 0; n < N; ++n)
            top = at::vec::maximum(top, (V::loadu(rows[n] + k, count) - V(max[n])) - V(log_sum[n]));
          top = V::blendv(top, zero, top == neg_inf);  // every member at -inf: the sum below is 0, log gives -inf
          V sum(0);
          for (int64_t n = 0; n < N; ++n)
            sum += vexp((V::loadu(rows[n] + k, count) - V(max[n])) - V(log_sum[n]) - top);
          (top + sum.log() - vlog_n).store(o + k, count);
        }
        break;
      }
    }
  }
}

// The backward of mean_probs and log_mean_probs for short rows (K <= kShortRowClasses), W rows at a time: the
// logits, grad_out and out tiles transposed into vectors across the rows, then the row path's arithmetic.
template <typename scalar_t, typename acc_t>
void member_softmax_backward_short_rows(const BackwardArgs& a, int64_t row_begin, int64_t row_end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t N = a.x.members, R = a.x.rows, K = a.x.classes;
  const acc_t* aux = static_cast<const acc_t*>(a.aux);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  const bool log_output = a.reduction == Reduction::kLogMeanProbs;
  const V neg_inf(-kInf<acc_t>), zero(0), n_members(static_cast<acc_t>(N)), log_n(std::log(static_cast<acc_t>(N)));
  alignas(64) acc_t x_tile[kShortRowClasses * W], g_tile[kShortRowClasses * W], o_tile[kShortRowClasses * W];
  alignas(64) acc_t lanes[W];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
    const int64_t rows = std::min<int64_t>(W, row_end - r0);
    // grad_out and out are contiguous [R, K] acc_t: the same transposed tiles, as one-member "logits".
    const LogitsView g_view{static_cast<const acc_t*>(a.grad_out), a.x.dtype, 1, R, K, 0, K, 1};
    const LogitsView o_view{static_cast<const acc_t*>(a.out), a.x.dtype, 1, R, K, 0, K, 1};
    load_tile<acc_t, acc_t, W>(g_view, 0, r0, rows, g_tile);
    if (log_output) load_tile<acc_t, acc_t, W>(o_view, 0, r0, rows, o_tile);
    for (int64_t n = 0; n < N; ++n) {
      load_tile<scalar_t, acc_t, W>(a.x, n, r0, rows, x_tile);
      // The member's saved row max and sum of exp(x - max) (lanes past `rows`: 0 and 1).
      for (int64_t i = 0; i < W; ++i) lanes[i] = i < rows ? aux[n * R + r0 + i] : acc_t(0);
      const V max = V::loadu(lanes);
      for (int64_t i = 0; i < W; ++i) lanes[i] = i < rows ? aux[(N + n) * R + r0 + i] : acc_t(1);
      const V log_sum = V::loadu(lanes).log();
      // t = log s = (x - max) - log sum: exact for logits of any magnitude.
      V t[kShortRowClasses];
      for (int64_t k = 0; k < K; ++k) t[k] = (V::loadu(x_tile + k * W) - max) - log_sum;
      V d[kShortRowClasses];
      if (!log_output) {
        // s (g - <g, s>) / N, s = exp(t)
        V g_dot_s(0);
        for (int64_t k = 0; k < K; ++k) {
          d[k] = vexp(t[k]);
          g_dot_s += V::loadu(g_tile + k * W) * d[k];
        }
        for (int64_t k = 0; k < K; ++k) d[k] = d[k] * (V::loadu(g_tile + k * W) - g_dot_s) / n_members;
      } else {
        // h - s sum(h), h = g s / (N p) = g exp(t - out - log N), the ratio taken in log space (right where s
        // underflows), and h = 0 where it is undefined: x = -inf (then out may be -inf too).
        V h_sum(0);
        for (int64_t k = 0; k < K; ++k) {
          d[k] = V::blendv(V::loadu(g_tile + k * W) * vexp(t[k] - V::loadu(o_tile + k * W) - log_n), zero,
                           t[k] == neg_inf);
          h_sum += d[k];
        }
        for (int64_t k = 0; k < K; ++k) d[k] = d[k] - vexp(t[k]) * h_sum;
      }
      for (int64_t k = 0; k < K; ++k) d[k].store(x_tile + k * W);
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* dst = grad + (n * R + r0 + i) * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<scalar_t>(x_tile[k * W + i]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void reduce_backward_rows(const BackwardArgs& a, int64_t row_begin, int64_t row_end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t N = a.x.members, R = a.x.rows, K = a.x.classes;
  const acc_t* grad_out = static_cast<const acc_t*>(a.grad_out);
  const acc_t* out = static_cast<const acc_t*>(a.out);
  const acc_t* aux = static_cast<const acc_t*>(a.aux);
  const V vcount(static_cast<acc_t>(N));

  if (a.reduction == Reduction::kMean || a.reduction == Reduction::kSoftmaxOfMean) {
    acc_t* grad = static_cast<acc_t*>(a.grad);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const acc_t* g = grad_out + r * K;
      const acc_t* o = out + r * K;
      acc_t* d = grad + r * K;
      if (a.reduction == Reduction::kMean) {
        for (int64_t k = 0; k < K; k += W) {
          const int64_t count = std::min<int64_t>(W, K - k);
          (V::loadu(g + k, count) / vcount).store(d + k, count);
        }
      } else {
        const V g_dot_o(dot(g, o, K));
        for (int64_t k = 0; k < K; k += W) {
          const int64_t count = std::min<int64_t>(W, K - k);
          (V::loadu(o + k, count) * (V::loadu(g + k, count) - g_dot_o) / vcount).store(d + k, count);
        }
      }
    }
    return;
  }

  if (K <= kShortRowClasses) return member_softmax_backward_short_rows<scalar_t, acc_t>(a, row_begin, row_end);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  MemberRows<scalar_t, acc_t> members(a.x, 1);
  std::unique_ptr<acc_t[]> scratch(new acc_t[2 * K]);
  acc_t* probs = scratch.get();  // s_n = exp(x_n - max_n) / sum_n
  acc_t* work = scratch.get() + K;
  const V neg_inf(-kInf<acc_t>), zero(0);
  const acc_t log_n = std::log(static_cast<acc_t>(N));

  for (int64_t r = row_begin; r < row_end; ++r) {
    const acc_t* g = grad_out + r * K;
    const acc_t* o = out + r * K;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* p = members.get(n, r, 0);
      // The member's saved row max and sum of exp(x - max): log s = (x - max) - log sum, exact for logits of any
      // magnitude (x - lse with a rounded log-sum-exp is not).
      const acc_t max = aux[n * R + r];
      const V vmax(max), vlog_sum(std::log(aux[(N + n) * R + r]));
      scalar_t* dst = grad + (n * R + r) * K;
      acc_t* result = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(dst) : work;
      if (a.reduction == Reduction::kMeanProbs) {
        // s (g - <g, s>) / N
        exp_store_sum(p, max, probs, K);
        scale_add(probs, acc_t(1) / aux[(N + n) * R + r], probs, K, /*accumulate=*/false);
        const V g_dot_s(dot(g, probs, K));
        for (int64_t k = 0; k < K; k += W) {
          const int64_t count = std::min<int64_t>(W, K - k);
          (V::loadu(probs + k, count) * (V::loadu(g + k, count) - g_dot_s) / vcount).store(result + k, count);
        }
      } else {
        // h - s sum(h), h = g s / (N p) = g exp(log s - out - log N), the ratio taken in log space (right where s
        // underflows), and h = 0 where it is undefined: x = -inf (then out may be -inf too).
        const V vlog_n(log_n);
        V h_sum(0);
        for (int64_t k = 0; k < K; k += W) {
          const int64_t count = std::min<int64_t>(W, K - k);
          const V t = (V::loadu(p + k, count) - vmax) - vlog_sum;
          const V h = V::blendv(V::loadu(g + k, count) * vexp(t - V::loadu(o + k, count) - vlog_n), zero,
                                t == neg_inf);
          h.store(work + k, count);
          h_sum += V::set(zero, h, count);
        }
        const V total(hsum(h_sum));
        for (int64_t k = 0; k < K; k += W) {
          const int64_t count = std::min<int64_t>(W, K - k);
          const V t = (V::loadu(p + k, count) - vmax) - vlog_sum;
          (V::loadu(work + k, count) - vexp(t) * total).store(result + k, count);
        }
      }
      if (!std::is_same_v<scalar_t, acc_t>) store_row(result, dst, K);
    }
  }
}

// First index of `value` among tile[k * W + lane], k < K (for NaN, the first NaN): first_index_of on a tile column.
template <typename T, int64_t W>
int64_t first_index_in_column(const T* tile, int64_t K, int64_t lane, T value) {
  for (int64_t k = 0; k < K; ++k) {
    const T v = tile[k * W + lane];
    if (std::isnan(value) ? std::isnan(v) : v == value) return k;
  }
  return 0;
}

// ensemble statistics for short rows (K <= kShortRowClasses), W rows at a time as mean_probs_short_rows, with the
// row path's arithmetic on vectors across the rows; the argmaxes are found per lane on the transposed tile.
template <typename scalar_t, typename acc_t>
void stats_short_rows(const StatsArgs& a, int64_t row_begin, int64_t row_end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t N = a.x.members, K = a.x.classes;
  const V neg_inf(-kInf<acc_t>), zero(0), n_members(static_cast<acc_t>(N));
  alignas(64) acc_t tile[kShortRowClasses * W];
  alignas(64) acc_t lanes[W];
  std::unique_ptr<int64_t[]> member_prediction(new int64_t[N * W]);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
    const int64_t rows = std::min<int64_t>(W, row_end - r0);
    V probs[kShortRowClasses];
    for (int64_t k = 0; k < K; ++k) probs[k] = V(0);
    V entropy_sum(0);
    for (int64_t n = 0; n < N; ++n) {
      load_tile<scalar_t, acc_t, W>(a.x, n, r0, rows, tile);
      V m = neg_inf;
      for (int64_t k = 0; k < K; ++k) m = at::vec::maximum(m, V::loadu(tile + k * W));
      m.store(lanes);
      for (int64_t i = 0; i < rows; ++i) {
        member_prediction[n * W + i] = first_index_in_column<acc_t, W>(tile, K, i, lanes[i]);
      }
      V e[kShortRowClasses];
      V sum(0), dot(0);
      for (int64_t k = 0; k < K; ++k) {
        const V d = V::loadu(tile + k * W) - m;
        e[k] = vexp(d);
        sum += e[k];
        dot += V::blendv(zero, e[k] * d, e[k] > zero);
      }
      // H_n = log(sum) - sum e (x - max) / sum (see the row path; rows without a softmax end up NaN anyway).
      entropy_sum += sum.log() - dot / sum;
      const V scale = V(1) / (n_members * sum);
      for (int64_t k = 0; k < K; ++k) probs[k] += e[k] * scale;
    }
    V confidence = neg_inf, entropy(0);
    for (int64_t k = 0; k < K; ++k) {
      probs[k].store(tile + k * W);
      confidence = at::vec::maximum(confidence, probs[k]);
      entropy += V::blendv(probs[k] * probs[k].log(), zero, probs[k] == zero);
    }
    entropy = zero - entropy;
    alignas(64) acc_t confidence_lanes[W], entropy_lanes[W], entropy_sum_lanes[W];
    confidence.store(confidence_lanes);
    entropy.store(entropy_lanes);
    entropy_sum.store(entropy_sum_lanes);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = r0 + i;
      for (int64_t k = 0; k < K; ++k) static_cast<acc_t*>(a.probs)[r * K + k] = tile[k * W + i];
      const int64_t prediction = first_index_in_column<acc_t, W>(tile, K, i, confidence_lanes[i]);
      int64_t disagree = 0;
      for (int64_t n = 0; n < N; ++n) disagree += member_prediction[n * W + i] != prediction;
      store_row_stats<acc_t>(a, r, confidence_lanes[i], prediction, entropy_lanes[i], entropy_sum_lanes[i],
                             disagree);
    }
  }
}

template <typename scalar_t, typename acc_t>
void stats_forward_rows(const StatsArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.x.classes <= kShortRowClasses) return stats_short_rows<scalar_t, acc_t>(a, row_begin, row_end);
  const int64_t N = a.x.members, K = a.x.classes;
  acc_t* probs_out = static_cast<acc_t*>(a.probs);
  MemberRows<scalar_t, acc_t> members(a.x, 1);
  std::unique_ptr<acc_t[]> exps(new acc_t[K]);
  std::unique_ptr<int64_t[]> member_prediction(new int64_t[N]);

  for (int64_t r = row_begin; r < row_end; ++r) {
    acc_t* probs = probs_out + r * K;
    acc_t entropy_sum = 0;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* p = members.get(n, r, 0);
      const acc_t m = row_max(p, K);
      member_prediction[n] = first_index_of(p, K, m);
      acc_t sum, dot_shifted;
      exp_store_sum_dot(p, m, exps.get(), K, sum, dot_shifted);
      // H_n = -sum s (x - lse) = log(sum) - sum e (x - max) / sum, with s = e / sum, e = exp(x - max). A member
      // row without a softmax (NaN, +inf, or -inf everywhere) makes the row's statistics NaN (store_row_stats).
      entropy_sum += std::log(sum) - dot_shifted / sum;
      scale_add(exps.get(), acc_t(1) / (static_cast<acc_t>(N) * sum), probs, K, /*accumulate=*/n > 0);
    }
    const acc_t confidence = row_max(probs, K);
    const int64_t prediction = first_index_of(probs, K, confidence);
    int64_t disagree = 0;
    for (int64_t n = 0; n < N; ++n) disagree += member_prediction[n] != prediction;
    store_row_stats<acc_t>(a, r, confidence, prediction, neg_xlogx_sum(probs, K), entropy_sum, disagree);
  }
}

// One entry point per function: picks the (logits, accumulation) types; the op layer has checked the dtype.
#define FUSED_ENSEMBLE_DISPATCH_DTYPE(dtype, kernel, ...)                        \
  switch (dtype) {                                                              \
    case c10::ScalarType::Double:                                               \
      return kernel<double, double>(__VA_ARGS__);                               \
    case c10::ScalarType::Half:                                                 \
      return kernel<c10::Half, float>(__VA_ARGS__);                             \
    case c10::ScalarType::BFloat16:                                             \
      return kernel<c10::BFloat16, float>(__VA_ARGS__);                         \
    default:                                                                    \
      return kernel<float, float>(__VA_ARGS__);                                 \
  }

void reduce_forward(const ForwardArgs& a, int64_t row_begin, int64_t row_end) {
  FUSED_ENSEMBLE_DISPATCH_DTYPE(a.x.dtype, reduce_forward_rows, a, row_begin, row_end)
}

void mean_flat(const ForwardArgs& a, int64_t begin, int64_t end) {
  FUSED_ENSEMBLE_DISPATCH_DTYPE(a.x.dtype, mean_flat_range, a, begin, end)
}

void reduce_backward(const BackwardArgs& a, int64_t row_begin, int64_t row_end) {
  FUSED_ENSEMBLE_DISPATCH_DTYPE(a.x.dtype, reduce_backward_rows, a, row_begin, row_end)
}

void stats_forward(const StatsArgs& a, int64_t row_begin, int64_t row_end) {
  FUSED_ENSEMBLE_DISPATCH_DTYPE(a.x.dtype, stats_forward_rows, a, row_begin, row_end)
}

#undef FUSED_ENSEMBLE_DISPATCH_DTYPE

}  // namespace
}  // namespace fused_ensemble::cpu::CPU_CAPABILITY
