// Kernels compiled for several vector units from one body: LT_VECTOR_KERNEL(name, params, args) defines
// name_avx512, name_avx2 and name_baseline, each calling the always-inline name_body(args) (so the compiler
// vectorises it for that unit), and name_kernel(), the widest of them isa() allows, chosen once. The
// integer and floating-point operations are the same in every variant; only the vector width differs.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define LT_TARGET_AVX512 __attribute__((target("avx512f")))
#define LT_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define LT_TARGET_AVX512
#define LT_TARGET_AVX2
#endif

#define LT_INLINE inline __attribute__((always_inline))

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace lispetorch::simd {

enum class Isa { aten, avx2, avx512 };

// The widest vector unit the CPU kernels use: the processor's, capped by LISPETORCH_ISA=avx2 or =aten (read once per
// process: for processors where AVX-512 lowers the clock, and for testing every path on one machine; aten leaves the
// work to ATen, or to the kernels' baseline build where they have no ATen path).
inline Isa isa() {
  static const Isa chosen = [] {
    const char* cap = std::getenv("LISPETORCH_ISA");
    const std::string want = cap ? cap : "";
    TORCH_CHECK(want.empty() || want == "avx2" || want == "aten",
                "LISPETORCH_ISA must be avx2 or aten (or unset), got '", want, "'");
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (want.empty() && __builtin_cpu_supports("avx512f")) return Isa::avx512;
    if (want != "aten" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
    return Isa::aten;
  }();
  return chosen;
}

// The AVX-512 variant where isa() allows it, else AVX2, else the baseline build.
template <typename Fn>
Fn widest(Fn avx512, Fn avx2, Fn baseline) {
  switch (isa()) {
    case Isa::avx512: return avx512;
    case Isa::avx2: return avx2;
    default: return baseline;
  }
}

}  // namespace lispetorch::simd

#define LT_VECTOR_KERNEL(name, params, args)                                                          \
  LT_TARGET_AVX512 void name##_avx512 params { name##_body args; }                                   \
  LT_TARGET_AVX2 void name##_avx2 params { name##_body args; }                                       \
  void name##_baseline params { name##_body args; }                                                   \
  inline auto name##_kernel() {                                                                       \
    static const auto fn = ::lispetorch::simd::widest(&name##_avx512, &name##_avx2, &name##_baseline); \
    return fn;                                                                                        \
  }
