// The dropout mask's counter-based draw, shared by the dropout kernels (dropout.cpp) and the fused products that
// apply the mask as they read (skinny_cpu.cpp). For element i (row-major index into the tensor viewed as (N, in)):
//   u = mix32((mix32(lo32(i) ^ k1) + hi32(i) * 0x9E3779B9 + k2) mod 2³²),   keep = u >= round(p · 2³²)
// with (k1, k2) derived from the seed by splitmix64 and mix32 Wellons' "lowbias32" integer hash. It is a pure
// function of (seed, i): forward and backward produce the same mask without storing it.
#pragma once

#include "simd.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lispetorch::mask {

struct Key {
  uint32_t k1, k2, threshold;
};

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline Key make_key(double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  uint64_t state = static_cast<uint64_t>(seed);
  Key key;
  key.k1 = static_cast<uint32_t>(splitmix64(state));
  key.k2 = static_cast<uint32_t>(splitmix64(state));
  const double t = std::round(p * 4294967296.0);
  key.threshold = static_cast<uint32_t>(std::min(t, 4294967295.0));
  return key;
}

// On uint32_t or on a vector of them (GCC vector extensions): the same arithmetic lane by lane.
template <typename T>
LT_INLINE T mix32(T x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The draw of the indices whose low half is lo, add = hi32(i) · 0x9E3779B9 + k2 (k2 where i < 2³²): on uint32_t or
// on vectors of them, as the kernels draw a run of indices at once.
template <typename T>
LT_INLINE T draw_low(T lo, uint32_t k1, uint32_t add) {
  return mix32(mix32(lo ^ k1) + add);
}

inline uint32_t draw(uint64_t i, const Key& key) {
  const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(i >> 32);
  return draw_low(lo, key.k1, hi * 0x9E3779B9u + key.k2);
}

}  // namespace lispetorch::mask
