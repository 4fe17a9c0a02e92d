// Kernels compiled for several vector units from one body: LT_VECTOR_KERNEL(name, params, args) defines
// name_avx512, name_avx2 and name_baseline, each calling the always-inline name_body(args) (so the compiler
// vectorises it for that unit), and name_kernel(), the widest of them this processor runs, chosen once. The
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

namespace lispetorch::simd {

// The AVX-512 variant where the processor has it, else AVX2, else the baseline build.
template <typename Fn>
Fn widest(Fn avx512, Fn avx2, Fn baseline) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return avx512;
  if (__builtin_cpu_supports("avx2")) return avx2;
#else
  (void)avx512;
  (void)avx2;
#endif
  return baseline;
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
