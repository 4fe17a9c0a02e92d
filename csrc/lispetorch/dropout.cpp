// Counter-based inverted dropout: the mask's draw is in mask.h, a pure function of (seed, index), so forward and
// backward produce the same mask without storing it, and every device produces the same mask (the generic path
// below is plain ATen integer arithmetic; the CPU kernel is a fused loop that tests check against it bit for bit).
#include "lispetorch.h"
#include "mask.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace lispetorch {
namespace {

using MaskKey = mask::Key;
using mask::draw;
using mask::make_key;

// Generic path: the same arithmetic in int64 ATen ops, masked to 32 bits after every step that can carry.
at::Tensor mix32_aten(at::Tensor x) {
  const int64_t m = 0xFFFFFFFFll;
  x = at::bitwise_xor(x, at::bitwise_right_shift(x, 16));
  x = at::bitwise_and(at::mul(x, 0x7feb352dll), m);
  x = at::bitwise_xor(x, at::bitwise_right_shift(x, 15));
  x = at::bitwise_and(at::mul(x, 0x846ca68bll), m);
  x = at::bitwise_xor(x, at::bitwise_right_shift(x, 16));
  return x;
}

// u[j] = the draw of index lo0 + j within one run of 2³² indices (the high half's term folded into add): a loop on
// 32-bit lanes that vectorises, compiled for each vector unit (simd.h; the integer arithmetic is the same on every
// path, so the masks are too).
LT_INLINE void draw_run_body(uint32_t* u, uint32_t lo0, int64_t len, uint32_t k1, uint32_t add) {
  for (int64_t j = 0; j < len; ++j) u[j] = mask::draw_low(lo0 + static_cast<uint32_t>(j), k1, add);
}
LT_VECTOR_KERNEL(draw_run, (uint32_t* u, uint32_t lo0, int64_t len, uint32_t k1, uint32_t add),
                 (u, lo0, len, k1, add))

// u[j] = the draw of element begin + j, j < len: draw_run over blocks that do not cross a multiple of 2³² in the
// index.
inline void draw_block(uint32_t* u, int64_t begin, int64_t len, const MaskKey& key) {
  const uint64_t first = static_cast<uint64_t>(begin);
  const uint32_t lo0 = static_cast<uint32_t>(first);
  if (static_cast<uint64_t>(lo0) + static_cast<uint64_t>(len) <= (1ull << 32)) {
    draw_run_kernel()(u, lo0, len, key.k1, static_cast<uint32_t>(first >> 32) * 0x9E3779B9u + key.k2);
  } else {
    for (int64_t j = 0; j < len; ++j) u[j] = draw(first + static_cast<uint64_t>(j), key);
  }
}

// Calls fn(u, begin, len) on blocks of up to 1024 elements, u holding their draws; blocks shared between threads.
template <typename F>
void for_each_block(int64_t n, const MaskKey& key, const F& fn) {
  constexpr int64_t kBlock = 1024;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 16, [&](int64_t block_begin, int64_t block_end) {
    uint32_t u[kBlock];
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t begin = blk * kBlock, len = std::min(kBlock, n - begin);
      draw_block(u, begin, len, key);
      fn(static_cast<const uint32_t*>(u), begin, len);
    }
  });
}

// float32 in one fused loop, draw and multiply together (no buffer of draws), on 32-bit lanes, compiled for each
// vector unit like draw_run. Indices lo0 + j within one run of 2³².
LT_INLINE void dropout_run_f32_body(const float* in, float* out, uint32_t lo0, int64_t len, uint32_t k1,
                                    uint32_t add, uint32_t threshold, float scale) {
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t u = mask::draw_low(lo0 + static_cast<uint32_t>(j), k1, add);
    out[j] = in[j] * (u >= threshold ? scale : 0.0f);
  }
}
LT_VECTOR_KERNEL(dropout_run_f32, (const float* in, float* out, uint32_t lo0, int64_t len, uint32_t k1,
                                   uint32_t add, uint32_t threshold, float scale),
                 (in, out, lo0, len, k1, add, threshold, scale))

// The pair for backward: xd = drop(x) and g = drop(g) in place, with one draw per element.
LT_INLINE void dropout_pair_run_f32_body(const float* x, float* xd, float* g, uint32_t lo0, int64_t len,
                                         uint32_t k1, uint32_t add, uint32_t threshold, float scale) {
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t u = mask::draw_low(lo0 + static_cast<uint32_t>(j), k1, add);
    const float m = u >= threshold ? scale : 0.0f;
    xd[j] = x[j] * m;
    g[j] = g[j] * m;
  }
}
LT_VECTOR_KERNEL(dropout_pair_run_f32, (const float* x, float* xd, float* g, uint32_t lo0, int64_t len,
                                        uint32_t k1, uint32_t add, uint32_t threshold, float scale),
                 (x, xd, g, lo0, len, k1, add, threshold, scale))

// One pass: out[i] = keep(i) ? in[i] / (1 - p) : 0.
template <typename scalar_t>
void dropout_kernel(const scalar_t* in, scalar_t* out, int64_t n, const MaskKey key, double p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (static_cast<uint64_t>(n) <= (1ull << 32)) {  // one run of 2³² indices: the fused loop
      const auto run = dropout_run_f32_kernel();
      const uint32_t add = key.k2;  // the high half of every index is 0
      at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
        run(in + begin, out + begin, static_cast<uint32_t>(begin), end - begin, key.k1, add, key.threshold, scale);
      });
      return;
    }
  }
  for_each_block(n, key, [&](const uint32_t* u, int64_t begin, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t m = u[j] >= key.threshold ? scale : acc_t(0);
      out[begin + j] = static_cast<scalar_t>(static_cast<acc_t>(in[begin + j]) * m);
    }
  });
}

// One pass for backward, which needs the same mask twice: xd = drop(x) (a new tensor) and g = drop(g) in place.
template <typename scalar_t>
void dropout_pair_kernel(const scalar_t* x, scalar_t* xd, scalar_t* g, int64_t n, const MaskKey key, double p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (static_cast<uint64_t>(n) <= (1ull << 32)) {  // one run of 2³² indices: the fused loop
      const auto run = dropout_pair_run_f32_kernel();
      at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
        run(x + begin, xd + begin, g + begin, static_cast<uint32_t>(begin), end - begin, key.k1, key.k2,
            key.threshold, scale);
      });
      return;
    }
  }
  for_each_block(n, key, [&](const uint32_t* u, int64_t begin, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t m = u[j] >= key.threshold ? scale : acc_t(0);
      xd[begin + j] = static_cast<scalar_t>(static_cast<acc_t>(x[begin + j]) * m);
      g[begin + j] = static_cast<scalar_t>(static_cast<acc_t>(g[begin + j]) * m);
    }
  });
}

void check_float(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.defined(), what, " is undefined");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), what, " must be a floating-point tensor, got ", x.scalar_type());
}

// out = drop(in) for contiguous in/out of the same dtype (out may alias in).
void apply_dropout(const at::Tensor& in, at::Tensor& out, double p, int64_t seed) {
  const MaskKey key = make_key(p, seed);
  const int64_t n = in.numel();
  if (in.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "lispetorch_dropout", [&] {
      dropout_kernel<scalar_t>(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, key, p);
    });
    return;
  }
  at::Tensor keep = dropout_mask(in, p, seed);
  out.copy_(at::mul(in, keep).mul_(1.0 / (1.0 - p)));
}

}  // namespace

at::Tensor dropout_mask(const at::Tensor& x, double p, int64_t seed) {
  check_float(x, "dropout input");
  const MaskKey key = make_key(p, seed);
  const int64_t m = 0xFFFFFFFFll;
  at::Tensor i = at::arange(x.numel(), x.options().dtype(at::kLong));
  at::Tensor lo = at::bitwise_and(i, m), hi = at::bitwise_right_shift(i, 32);
  at::Tensor u = mix32_aten(at::bitwise_xor(lo, static_cast<int64_t>(key.k1)));
  u = at::bitwise_and(u + at::mul(hi, 0x9E3779B9ll) + static_cast<int64_t>(key.k2), m);
  u = mix32_aten(u);
  return at::ge(u, static_cast<int64_t>(key.threshold)).view(x.sizes());
}

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  check_float(x, "dropout input");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  at::Tensor in = x.contiguous();
  if (p == 0.0) return in.clone();
  at::Tensor out = at::empty_like(in);
  apply_dropout(in, out, p, seed);
  return out;
}

namespace detail {
at::Tensor dropout_pair_(const at::Tensor& x, at::Tensor& g, double p, int64_t seed) {
  TORCH_CHECK(g.is_contiguous() && g.sizes() == x.sizes(), "dropout_pair_ needs a contiguous g shaped like x, got ",
              g.sizes(), " and ", x.sizes());
  at::Tensor in = x.contiguous();
  if (p == 0.0) return in;
  if (!in.device().is_cpu() || in.scalar_type() != g.scalar_type()) {
    dropout_inplace_(g, p, seed);
    return dropout(in, p, seed);
  }
  const MaskKey key = make_key(p, seed);
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "lispetorch_dropout_pair", [&] {
    dropout_pair_kernel<scalar_t>(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                  g.mutable_data_ptr<scalar_t>(), in.numel(), key, p);
  });
  return out;
}

void dropout_inplace_(at::Tensor& t, double p, int64_t seed) {
  TORCH_CHECK(t.is_contiguous(), "dropout_inplace_ needs a contiguous tensor");
  if (p == 0.0) return;
  apply_dropout(t, t, p, seed);
}
}  // namespace detail

}  // namespace lispetorch

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("dropout", &lispetorch::dropout);
  m.impl("dropout_mask", &lispetorch::dropout_mask);
}
