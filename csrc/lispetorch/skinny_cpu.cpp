// CPU float32 kernels for the fused linear's skinny products, with the dropout mask applied as they read.
//
// The low-rank products are each a pass over a tall (N, d) matrix, x or the output gradient, against a few
// dozen columns: BLAS runs them at about 75 % of its rate on the frozen layer's product, and the mask would take a
// pass of its own. Here each is one pass over the tall operand with the rank-sized operand in registers or the L1
// cache, the mask drawn lane by lane (mask.h) where the operand is read, and backward's two products that read
// drop(x) (dL/dA and the adapter's part of dL/dx) share that pass. Four kernels:
//
//   rows_panel   out (N, r)  = drop(a) P          a (N, K) tall, P (K, rp) the factor packed: register tiles of
//                                                 8 rows × one vector of columns, K accumulated in one sweep; on
//                sums (2, K) = Σₙ aₙ yₙ, Σₙ aₙ     request (no mask) the column sums of a and of a ⊙ y from the
//                                                 same tiles, each tile's rows re-read from the L1 cache
//   small_rows   out (N, d)  = bias + a Q         a (N, r), Q (r, d): tiles of 4 rows × 2 vectors of columns
//   columns      out (r, d)  = aᵀ drop(b)         a (N, rp) padded, b (N, d) tall: per stripe of one vector of
//                c   (N, d)  = mask ⊙ (a Q)       columns, 16 rows of out accumulate over N in registers; c, when
//                                                 asked, is the product with Q (rp, d) from the same loads of a
//                                                 (column sums are rows_panel's: read in stripes, y costs twice
//                                                 a pass of its own)
//   row_norms    ‖Wᵢ + Cᵢ A‖ (N)                 DoRA's norms: each row of the sum formed a vector at a time, never
//                                                 stored, 8 rows at once against one vector of A; with the
//                                                 magnitude, g = m / n and the rows of W scaled by g, from the
//                                                 same reads
//
// Every output element is summed in a fixed order whatever the number of threads (threads take whole row blocks,
// whole groups of them for rows_panel's sums, or whole column stripes), so results are reproducible run to run.
// Compiled for AVX-512 and for AVX2+FMA, chosen at run time; other processors take the ATen path in lora_linear.cpp.
#include "lispetorch.h"
#include "mask.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lispetorch::detail {

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

constexpr int64_t kRowBlock = 8;  // rows_panel's register tile
constexpr int64_t kJ = 16;        // columns' rows of out per sweep; a and Q are padded to a multiple of it
constexpr int64_t kAhead = 16;    // columns' software prefetch distance, in rows
constexpr int64_t kSumRows = 256; // columns' blocks of rows summed on their own

// The mask as the kernels apply it: multipliers 1/(1-p) where kept, 0 where dropped, for lanes idx0 + l.
struct Mask {
  bool on;
  mask::Key key;
  float scale;
};

// columns' output: p = s · aᵀ drop(b), (r, d) or, transposed, (d, r), null when not wanted.
struct Out {
  float* p;
  bool transposed;
  float scale;
};

// rows_panel's column sums, when wanted (sum not null): sum += Σ aᵢ and, with y, dot += Σ aᵢ ⊙ yᵢ over the rows of
// the group being summed (each group's own partial sums, K long).
struct Sums {
  const float* y;
  float* dot;
  float* sum;
};

template <typename V>
LT_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
LT_INLINE void store(float* p, const V& v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(float));
}

// Row blocks [b0, b1) of RB rows: tile(rb, i0) on rows [i0, i0 + rb), rb = RB for whole blocks, 1 for the rows past
// the last (rb an std::integral_constant, so each tile is compiled for its size). The tile is an always-inline
// lambda: it is compiled within the caller, for its vector unit.
template <int RB, typename Tile>
LT_INLINE void row_tiles(int64_t N, int64_t b0, int64_t b1, const Tile& tile) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * RB;
    if (i0 + RB <= N) {
      tile(std::integral_constant<int, RB>{}, i0);
    } else {
      for (int64_t i = i0; i < N; ++i) tile(std::integral_constant<int, 1>{}, i);
    }
  }
}

// 0, 1, …, W−1 (a constant the compiler folds).
template <typename U, int W>
LT_INLINE U iota() {
  if constexpr (W == 1) {
    return 0u;
  } else {
    U v{};
    for (int l = 0; l < W; ++l) v[l] = static_cast<uint32_t>(l);
    return v;
  }
}

// V a vector of W floats (W = 1: a float), U the same of uint32_t.
template <typename V, typename U, int W>
LT_INLINE V multipliers(const Mask& m, uint32_t idx0) {
  const U idx = iota<U, W>() + idx0;
  const U u = mask::draw_low(idx, m.key.k1, m.key.k2);  // indices below 2³² (skinny_available)
  const V kept = V{} + m.scale, dropped = V{};
  return u >= U{} + m.key.threshold ? kept : dropped;
}

// rows_panel on rows [i0, i0 + RB): the rows of a (masked into buf when the mask is on), times P.
template <typename V, typename U, int W, int RB>
LT_INLINE void panel_tile(const float* a, int64_t K, const float* P, int64_t rp, int64_t width, float* out,
                          const Mask& m, int64_t i0, float* buf) {
  const float* src = a + i0 * K;
  if (m.on) {
    for (int ii = 0; ii < RB; ++ii) {
      const float* row = a + (i0 + ii) * K;
      float* dst = buf + ii * K;
      const uint32_t base = static_cast<uint32_t>((i0 + ii) * K);
      int64_t k = 0;
      for (; k + W <= K; k += W) {
        const V v = load<V>(row + k) * multipliers<V, U, W>(m, base + static_cast<uint32_t>(k));
        store(dst + k, v, W);
      }
      for (; k < K; ++k) dst[k] = row[k] * multipliers<float, uint32_t, 1>(m, base + static_cast<uint32_t>(k));
    }
    src = buf;
  }
  for (int64_t c0 = 0; c0 < width; c0 += W) {
    V acc[RB];
    for (int ii = 0; ii < RB; ++ii) acc[ii] = V{};
    for (int64_t k = 0; k < K; ++k) {
      const V p = load<V>(P + k * rp + c0);
      for (int ii = 0; ii < RB; ++ii) acc[ii] += src[ii * K + k] * p;
    }
    const int64_t n = std::min<int64_t>(W, width - c0);
    for (int ii = 0; ii < RB; ++ii) store(out + (i0 + ii) * width + c0, acc[ii], n);
  }
}

// The column sums of the RB rows of a from i0 (and of their products with y's), the tile's rows summed first, then
// added to the group's partial sums.
template <typename V, int W, int RB>
LT_INLINE void sums_tile(const float* a, int64_t K, const Sums& sm, int64_t i0) {
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V dot{}, sum{};
    for (int ii = 0; ii < RB; ++ii) {
      const V av = load<V>(a + (i0 + ii) * K + k);
      if (sm.y) dot += av * load<V>(sm.y + (i0 + ii) * K + k);
      sum += av;
    }
    if (sm.y) store(sm.dot + k, load<V>(sm.dot + k) + dot, W);
    store(sm.sum + k, load<V>(sm.sum + k) + sum, W);
  }
  for (; k < K; ++k) {  // the columns past the last whole vector
    float dot = 0.0f, sum = 0.0f;
    for (int ii = 0; ii < RB; ++ii) {
      const float av = a[(i0 + ii) * K + k];
      if (sm.y) dot += av * sm.y[(i0 + ii) * K + k];
      sum += av;
    }
    if (sm.y) sm.dot[k] += dot;
    sm.sum[k] += sum;
  }
}

// rows_panel on the row blocks [b0, b1), with the column sums when sm.sum is set (no mask then).
template <typename V, typename U, int W>
LT_INLINE void rows_panel_range(const float* a, int64_t N, int64_t K, const float* P, int64_t rp, int64_t width,
                                float* out, const Mask& m, const Sums& sm, int64_t b0, int64_t b1) {
  std::vector<float> buf(m.on ? static_cast<size_t>(kRowBlock * K) : 0);
  row_tiles<kRowBlock>(N, b0, b1, [&](auto rb, int64_t i0) __attribute__((always_inline)) {
    panel_tile<V, U, W, decltype(rb)::value>(a, K, P, rp, width, out, m, i0, buf.data());
    if (sm.sum) sums_tile<V, W, decltype(rb)::value>(a, K, sm, i0);
  });
}

// small_rows on rows [i0, i0 + RB) and columns [o0, o0 + OB·W').
template <typename V, int W, int RB, int OB>
LT_INLINE void small_tile(const float* a, int64_t r, const float* Q, int64_t d, const float* bias,
                          const float* base, float* out, int64_t i0, int64_t o0) {
  V acc[RB][OB];
  for (int v = 0; v < OB; ++v) {
    const V b0 = bias ? load<V>(bias + o0 + v * W) : V{};
    for (int ii = 0; ii < RB; ++ii) acc[ii][v] = base ? b0 + load<V>(base + (i0 + ii) * d + o0 + v * W) : b0;
  }
  for (int64_t j = 0; j < r; ++j) {
    V q[OB];
    for (int v = 0; v < OB; ++v) q[v] = load<V>(Q + j * d + o0 + v * W);
    for (int ii = 0; ii < RB; ++ii) {
      const float aij = a[(i0 + ii) * r + j];
      for (int v = 0; v < OB; ++v) acc[ii][v] += aij * q[v];
    }
  }
  for (int ii = 0; ii < RB; ++ii)
    for (int v = 0; v < OB; ++v) store(out + (i0 + ii) * d + o0 + v * W, acc[ii][v], W);
}

template <typename V, int W, int RB>
LT_INLINE void small_rows_block(const float* a, int64_t r, const float* Q, int64_t d, const float* bias,
                                const float* base, float* out, int64_t i0) {
  int64_t o0 = 0;
  for (; o0 + 2 * W <= d; o0 += 2 * W) small_tile<V, W, RB, 2>(a, r, Q, d, bias, base, out, i0, o0);
  for (; o0 + W <= d; o0 += W) small_tile<V, W, RB, 1>(a, r, Q, d, bias, base, out, i0, o0);
  for (; o0 < d; ++o0) small_tile<float, 1, RB, 1>(a, r, Q, d, bias, base, out, i0, o0);
}

constexpr int64_t kSmallRows = 4;  // small_rows' register tile

// small_rows on the row blocks [b0, b1).
template <typename V, int W>
LT_INLINE void small_rows_range(const float* a, int64_t N, int64_t r, const float* Q, int64_t d, const float* bias,
                                const float* base, float* out, int64_t b0, int64_t b1) {
  row_tiles<kSmallRows>(N, b0, b1, [&](auto rb, int64_t i0) __attribute__((always_inline)) {
    small_rows_block<V, W, decltype(rb)::value>(a, r, Q, d, bias, base, out, i0);
  });
}

// columns on the stripe of columns [o0, o0 + W) for rows jc… of out (kJ of them, a and Q padded). Sums over the
// rows run in blocks of kSumRows, each block's added to the total: the error grows with N / kSumRows, not N.
template <typename V, typename U, int W>
LT_INLINE void columns_stripe(const float* a, int64_t N, int64_t rp, const float* b, int64_t d, const Mask& m,
                              const Out& out, int64_t r, const float* Q, float* c, int64_t o0, int64_t jc) {
  V total[kJ], acc[kJ];
  for (int j = 0; j < kJ; ++j) total[j] = acc[j] = V{};
  const bool first = jc == 0, last = jc + kJ >= rp;
  for (int64_t i = 0; i < N; ++i) {
    // The stripe steps d floats a row, past the hardware prefetchers' reach: fetched kAhead rows ahead instead.
    __builtin_prefetch(b + std::min(i + kAhead, N - 1) * d + o0);
    if (c && !first) __builtin_prefetch(c + std::min(i + kAhead, N - 1) * d + o0);
    V bv = load<V>(b + i * d + o0);
    V mv{};
    if (m.on) {
      mv = multipliers<V, U, W>(m, static_cast<uint32_t>(i * d + o0));
      bv *= mv;
    }
    const float* ai = a + i * rp + jc;
    if (c) {
      V s0{}, s1{};
      for (int j = 0; j < kJ; j += 2) {
        acc[j] += ai[j] * bv;
        s0 += ai[j] * load<V>(Q + (jc + j) * d + o0);
        acc[j + 1] += ai[j + 1] * bv;
        s1 += ai[j + 1] * load<V>(Q + (jc + j + 1) * d + o0);
      }
      V s = s0 + s1;
      if (!first) s += load<V>(c + i * d + o0);
      if (last && m.on) s *= mv;
      store(c + i * d + o0, s, W);
    } else {
      for (int j = 0; j < kJ; ++j) acc[j] += ai[j] * bv;
    }
    if ((i + 1) % kSumRows == 0 || i + 1 == N) {
      for (int j = 0; j < kJ; ++j) {
        total[j] += acc[j];
        acc[j] = V{};
      }
    }
  }
  if (out.p && out.transposed) {
    for (int j = 0; j < kJ && jc + j < r; ++j) {
      float lanes[W];
      store(lanes, total[j], W);
      for (int l = 0; l < W; ++l) out.p[(o0 + l) * r + jc + j] = lanes[l] * out.scale;
    }
  } else if (out.p) {
    for (int j = 0; j < kJ && jc + j < r; ++j) store(out.p + (jc + j) * d + o0, total[j] * out.scale, W);
  }
}

// columns on the stripes [s0, s1): whole vectors of columns, then the columns past the last one, one by one.
template <typename V, typename U, int W>
LT_INLINE void columns_range(const float* a, int64_t N, int64_t rp, const float* b, int64_t d, const Mask& m,
                             const Out& out, int64_t r, const float* Q, float* c, int64_t s0, int64_t s1) {
  const int64_t full = d / W;
  for (int64_t s = s0; s < s1; ++s) {
    for (int64_t jc = 0; jc < rp; jc += kJ) {
      if (s < full) {
        columns_stripe<V, U, W>(a, N, rp, b, d, m, out, r, Q, c, s * W, jc);
      } else {
        columns_stripe<float, uint32_t, 1>(a, N, rp, b, d, m, out, r, Q, c, full * W + (s - full), jc);
      }
    }
  }
}

// DoRA's row factor wanted with the norms: g = m / n (0 where n is 0) into g, and the rows of W scaled by it into Wg
// when Wg is not null; m null: the norms alone.
struct Scaled {
  const float* m;
  float* g;
  float* Wg;
};

// row_norms on rows [i0, i0 + RB): ‖Wᵢ + Cᵢ A‖ with C already scaled, the rows of the sum formed a vector at a time
// and never stored; A (r, K) row-major, read from the L1 cache. With sc.m, g and the scaled rows of W, from the RB
// rows just read (still in the L1 cache).
template <typename V, int W, int RB>
LT_INLINE void norms_tile(const float* Wm, int64_t K, const float* C, const float* A, int64_t r, float* out,
                          const Scaled& sc, int64_t i0) {
  V sq[RB];
  for (int ii = 0; ii < RB; ++ii) sq[ii] = V{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V acc[RB];
    for (int ii = 0; ii < RB; ++ii) acc[ii] = load<V>(Wm + (i0 + ii) * K + k);
    for (int64_t j = 0; j < r; ++j) {
      const V a = load<V>(A + j * K + k);
      for (int ii = 0; ii < RB; ++ii) acc[ii] += C[(i0 + ii) * r + j] * a;
    }
    for (int ii = 0; ii < RB; ++ii) sq[ii] += acc[ii] * acc[ii];
  }
  for (int ii = 0; ii < RB; ++ii) {
    const int64_t i = i0 + ii;
    float lanes[W], total = 0.0f;
    store(lanes, sq[ii], W);
    for (int l = 0; l < W; ++l) total += lanes[l];
    for (int64_t kk = k; kk < K; ++kk) {  // the columns past the last whole vector
      float v = Wm[i * K + kk];
      for (int64_t j = 0; j < r; ++j) v += C[i * r + j] * A[j * K + kk];
      total += v * v;
    }
    const float n = std::sqrt(total);
    out[i] = n;
    if (!sc.m) continue;
    const float g = n > 0.0f ? sc.m[i] / n : 0.0f;
    sc.g[i] = g;
    if (!sc.Wg) continue;
    int64_t kk = 0;
    for (; kk + W <= K; kk += W) store(sc.Wg + i * K + kk, load<V>(Wm + i * K + kk) * g, W);
    for (; kk < K; ++kk) sc.Wg[i * K + kk] = Wm[i * K + kk] * g;
  }
}

template <typename V, int W>
LT_INLINE void row_norms_range(const float* Wm, int64_t N, int64_t K, const float* C, const float* A, int64_t r,
                               float* out, const Scaled& sc, int64_t b0, int64_t b1) {
  row_tiles<kRowBlock>(N, b0, b1, [&](auto rb, int64_t i0) __attribute__((always_inline)) {
    norms_tile<V, W, decltype(rb)::value>(Wm, K, C, A, r, out, sc, i0);
  });
}

typedef float v16sf __attribute__((vector_size(64)));
typedef uint32_t v16su __attribute__((vector_size(64)));
typedef float v8sf __attribute__((vector_size(32)));
typedef uint32_t v8su __attribute__((vector_size(32)));

// The kernels' loops live in functions compiled for one vector unit each; at::parallel_for's workers call them.
#define LT_SKINNY_VARIANTS(TGT, suffix, V, U, W)                                                               \
  __attribute__((target(TGT))) void rows_panel_##suffix(const float* a, int64_t N, int64_t K, const float* P,     \
                                                        int64_t rp, int64_t w, float* out, const Mask& m,         \
                                                        const Sums& sm, int64_t b0, int64_t b1) {                 \
    rows_panel_range<V, U, W>(a, N, K, P, rp, w, out, m, sm, b0, b1);                                            \
  }                                                                                                            \
  __attribute__((target(TGT))) void small_rows_##suffix(const float* a, int64_t N, int64_t r, const float* Q,     \
                                                        int64_t d, const float* bias, const float* base,          \
                                                        float* out, int64_t b0, int64_t b1) {                     \
    small_rows_range<V, W>(a, N, r, Q, d, bias, base, out, b0, b1);                                            \
  }                                                                                                            \
  __attribute__((target(TGT))) void columns_##suffix(const float* a, int64_t N, int64_t rp, const float* b,       \
                                                     int64_t d, const Mask& m, const Out& out, int64_t r,         \
                                                     const float* Q, float* c, int64_t s0, int64_t s1) {          \
    columns_range<V, U, W>(a, N, rp, b, d, m, out, r, Q, c, s0, s1);                                           \
  }                                                                                                            \
  __attribute__((target(TGT))) void row_norms_##suffix(const float* Wm, int64_t N, int64_t K, const float* C,     \
                                                       const float* A, int64_t r, float* out, const Scaled& sc,   \
                                                       int64_t b0, int64_t b1) {                                  \
    row_norms_range<V, W>(Wm, N, K, C, A, r, out, sc, b0, b1);                                                 \
  }

LT_SKINNY_VARIANTS("avx512f", avx512, v16sf, v16su, 16)
LT_SKINNY_VARIANTS("avx2,fma", avx2, v8sf, v8su, 8)

using simd::Isa;

Mask make_mask(double p, int64_t seed) {
  Mask m{p > 0.0, {}, 0.0f};
  if (m.on) {
    m.key = mask::make_key(p, seed);
    m.scale = static_cast<float>(1.0 / (1.0 - p));
  }
  return m;
}

void check_tall(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kFloat && t.device().is_cpu(), what,
              " must be a contiguous 2-D float32 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
}

}  // namespace

at::Tensor skinny_pack(const at::Tensor& t, int64_t rows, int64_t cols, double scale) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu() && rows >= t.size(0) &&
                  cols >= t.size(1),
              "skinny_pack: a 2-D float32 CPU tensor of at most (", rows, ", ", cols, ") expected, got ", t.sizes(),
              " ", t.scalar_type());
  at::Tensor out = at::empty({rows, cols}, t.options());
  const float* src = t.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const int64_t n = t.size(0), m = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  const float s = static_cast<float>(scale);
  for (int64_t i = 0; i < n; ++i) {
    float* d = dst + i * cols;
    const float* srow = src + i * s0;
    for (int64_t j = 0; j < m; ++j) d[j] = srow[j * s1] * s;
    std::fill(d + m, d + cols, 0.0f);
  }
  std::fill(dst + n * cols, dst + rows * cols, 0.0f);
  return out;
}

bool skinny_available(at::TensorList operands, int64_t rows, int64_t cols) {
  if (simd::isa() == Isa::aten || static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols) > (1ull << 32))
    return false;
  return std::all_of(operands.begin(), operands.end(), [](const at::Tensor& t) {
    return !t.defined() || (t.device().is_cpu() && t.scalar_type() == at::kFloat);
  });
}

int64_t skinny_pad(int64_t r) { return (r + kJ - 1) / kJ * kJ; }

namespace {
constexpr int64_t kSumBlocks = 8;  // rows_panel's sums: row blocks per group, each group summed on its own

// rows_panel, with the column sums of a (and of a ⊙ y) into sums (2, K) when sums is given (no mask then).
at::Tensor rows_panel(const at::Tensor& a, const at::Tensor& P, int64_t width, double p, int64_t seed,
                      const at::Tensor& y, at::Tensor* sums) {
  check_tall(a, "rows_panel's a");
  check_tall(P, "rows_panel's P");
  TORCH_CHECK(P.size(0) == a.size(1) && P.size(1) % kJ == 0 && P.size(1) >= width, "rows_panel: P ", P.sizes(),
              " does not fit a ", a.sizes(), " and width ", width);
  at::Tensor out = at::empty({a.size(0), width}, a.options());
  const Mask m = make_mask(p, seed);
  const auto fn = simd::isa() == Isa::avx512 ? &rows_panel_avx512 : &rows_panel_avx2;
  const int64_t N = a.size(0), K = a.size(1), blocks = (N + kRowBlock - 1) / kRowBlock;
  const float* ap = a.const_data_ptr<float>();
  const float* pp = P.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  if (!sums) {
    at::parallel_for(0, blocks, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * kRowBlock)),
                     [&](int64_t b0, int64_t b1) { fn(ap, N, K, pp, P.size(1), width, op, m, {}, b0, b1); });
    return out;
  }
  TORCH_CHECK(!m.on, "rows_panel: column sums are of the unmasked operand");
  if (y.defined()) {
    check_tall(y, "rows_panel's y");
    TORCH_CHECK(y.sizes() == a.sizes(), "rows_panel: y ", y.sizes(), " is not shaped like a ", a.sizes());
  }
  // Each group of kSumBlocks row blocks sums into a partial of its own, the partials then added in order: the same
  // sums whatever the number of threads, their error growing with N / (kSumBlocks · kRowBlock), not N.
  const int64_t groups = (blocks + kSumBlocks - 1) / kSumBlocks;
  at::Tensor partial = at::zeros({groups, 2, K}, a.options());
  float* part = partial.mutable_data_ptr<float>();
  const float* yp = y.defined() ? y.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      float* dot = part + g * 2 * K;
      fn(ap, N, K, pp, P.size(1), width, op, m, Sums{yp, dot, dot + K}, g * kSumBlocks,
         std::min(blocks, (g + 1) * kSumBlocks));
    }
  });
  *sums = at::zeros({2, K}, a.options());  // Σ a y (0 without y, or without rows), Σ a
  float* total = sums->mutable_data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t k = 0; k < 2 * K; ++k) total[k] += part[g * 2 * K + k];
  }
  return out;
}
}  // namespace

at::Tensor skinny_rows_panel(const at::Tensor& a, const at::Tensor& P, int64_t width, double p, int64_t seed) {
  return rows_panel(a, P, width, p, seed, at::Tensor(), nullptr);
}

SkinnyPanel skinny_rows_panel_sums(const at::Tensor& a, const at::Tensor& P, int64_t width,
                                   const std::optional<at::Tensor>& y) {
  SkinnyPanel res;
  res.out = rows_panel(a, P, width, 0.0, 0, y.value_or(at::Tensor()), &res.sums);
  return res;
}

at::Tensor skinny_small_rows(const at::Tensor& a, const at::Tensor& Q, const std::optional<at::Tensor>& bias,
                             const at::Tensor& base) {
  check_tall(a, "small_rows' a");
  check_tall(Q, "small_rows' Q");
  TORCH_CHECK(Q.size(0) == a.size(1), "small_rows: Q ", Q.sizes(), " does not fit a ", a.sizes());
  if (base.defined()) {
    check_tall(base, "small_rows' base");
    TORCH_CHECK(base.size(0) == a.size(0) && base.size(1) == Q.size(1), "small_rows: base ", base.sizes(),
                " does not fit a ", a.sizes(), " and Q ", Q.sizes());
  }
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kFloat && b.numel() == Q.size(1)), "small_rows: bias ",
              b.sizes(), " does not fit Q ", Q.sizes());
  at::Tensor out = at::empty({a.size(0), Q.size(1)}, a.options());
  const auto fn = simd::isa() == Isa::avx512 ? &small_rows_avx512 : &small_rows_avx2;
  const int64_t N = a.size(0), r = a.size(1), d = Q.size(1), blocks = (N + kSmallRows - 1) / kSmallRows;
  const float* ap = a.const_data_ptr<float>();
  const float* qp = Q.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* basep = base.defined() ? base.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d * kSmallRows)),
                   [&](int64_t b0, int64_t b1) { fn(ap, N, r, qp, d, bp, basep, op, b0, b1); });
  return out;
}

SkinnyColumns skinny_columns(const at::Tensor& a, const at::Tensor& b, int64_t r, double p, int64_t seed,
                             bool want_out, const std::optional<at::Tensor>& Q, bool transposed, double scale) {
  check_tall(a, "columns' a");
  check_tall(b, "columns' b");
  const int64_t N = b.size(0), d = b.size(1), rp = a.size(1);
  TORCH_CHECK(a.size(0) == N && rp % kJ == 0 && rp >= r, "columns: a ", a.sizes(), " does not fit b ", b.sizes(),
              " and r ", r);
  const bool with_c = Q.has_value() && Q->defined();
  if (with_c) {
    check_tall(*Q, "columns' Q");
    TORCH_CHECK(Q->size(0) == rp && Q->size(1) == d, "columns: Q ", Q->sizes(), " does not fit a ", a.sizes(),
                " and b ", b.sizes());
  }
  SkinnyColumns res;
  if (want_out) res.out = at::empty(transposed ? at::IntArrayRef{d, r} : at::IntArrayRef{r, d}, b.options());
  if (with_c) res.c = at::empty({N, d}, b.options());
  const Mask m = make_mask(p, seed);
  const auto fn = simd::isa() == Isa::avx512 ? &columns_avx512 : &columns_avx2;
  const int64_t W = simd::isa() == Isa::avx512 ? 16 : 8, stripes = d / W + d % W;
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  const float* qp = with_c ? Q->const_data_ptr<float>() : nullptr;
  const Out o{want_out ? res.out.mutable_data_ptr<float>() : nullptr, transposed, static_cast<float>(scale)};
  float* cp = with_c ? res.c.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, stripes, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * W)),
                   [&](int64_t s0, int64_t s1) { fn(ap, N, rp, bp, d, m, o, r, qp, cp, s0, s1); });
  return res;
}

SkinnyNorms skinny_row_norms(const at::Tensor& weight, const at::Tensor& C, const at::Tensor& A, double scale,
                             const at::Tensor& magnitude, bool scaled_weight) {
  check_tall(weight, "row_norms' weight");
  check_tall(A, "row_norms' A");
  TORCH_CHECK(C.dim() == 2 && C.size(0) == weight.size(0) && C.size(1) == A.size(0) && A.size(1) == weight.size(1),
              "row_norms: C ", C.sizes(), " and A ", A.sizes(), " do not fit weight ", weight.sizes());
  const at::Tensor Cs = skinny_pack(C, C.size(0), C.size(1), scale);
  const int64_t N = weight.size(0), K = weight.size(1), r = A.size(0), blocks = (N + kRowBlock - 1) / kRowBlock;
  SkinnyNorms res;
  res.norm = at::empty({N}, weight.options());
  Scaled sc{nullptr, nullptr, nullptr};
  at::Tensor m;
  if (magnitude.defined()) {
    m = magnitude.contiguous();
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.numel() == N, "row_norms: magnitude ", m.sizes(), " ",
                m.scalar_type(), " does not fit weight ", weight.sizes());
    res.g = at::empty({N}, weight.options());
    if (scaled_weight) res.scaled_weight = at::empty({N, K}, weight.options());
    sc = {m.const_data_ptr<float>(), res.g.mutable_data_ptr<float>(),
          scaled_weight ? res.scaled_weight.mutable_data_ptr<float>() : nullptr};
  }
  const auto fn = simd::isa() == Isa::avx512 ? &row_norms_avx512 : &row_norms_avx2;
  const float* wp = weight.const_data_ptr<float>();
  const float* cp = Cs.const_data_ptr<float>();
  const float* ap = A.const_data_ptr<float>();
  float* op = res.norm.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * kRowBlock * std::max<int64_t>(1, r)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { fn(wp, N, K, cp, ap, r, op, sc, b0, b1); });
  return res;
}

#else

bool skinny_available(at::TensorList, int64_t, int64_t) { return false; }
SkinnyNorms skinny_row_norms(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&, bool) {
  TORCH_CHECK(false, "the skinny CPU kernels are not built for this processor");
}
at::Tensor skinny_pack(const at::Tensor&, int64_t, int64_t, double) {
  TORCH_CHECK(false, "the skinny CPU kernels are not built for this processor");
}
int64_t skinny_pad(int64_t r) { return r; }
at::Tensor skinny_rows_panel(const at::Tensor&, const at::Tensor&, int64_t, double, int64_t) {
  TORCH_CHECK(false, "the skinny CPU kernels are not built for this processor");
}
SkinnyPanel skinny_rows_panel_sums(const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "the skinny CPU kernels are not built for this processor");
}
at::Tensor skinny_small_rows(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&) {
  TORCH_CHECK(false, "the skinny CPU kernels are not built for this processor");
}
SkinnyColumns skinny_columns(const at::Tensor&, const at::Tensor&, int64_t, double, int64_t, bool,
                             const std::optional<at::Tensor>&, bool, double) {
  TORCH_CHECK(false, "the skinny CPU kernels are not built for this processor");
}

#endif

}  // namespace lispetorch::detail
