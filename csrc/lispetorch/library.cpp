// The one place where the operator schemas of the `lispetorch` namespace are declared. Kernels are registered
// at the end of the source file that implements them.
#include "simd.h"

#include <torch/library.h>

#include <string>

TORCH_LIBRARY(lispetorch, m) {
  m.set_python_module("lispetorch.ops");  // holds the fake (meta) implementations
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_R, "
      "float scale, float dropout, int seed) -> Tensor");
  m.def(
      "lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_R, "
      "float scale, float dropout, int seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_backward(Tensor grad, Tensor? x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? lora_R, "
      "Tensor hr, float scale, float dropout, int seed, bool[6] output_mask) -> Tensor[]");
  m.def(
      "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_R, "
      "Tensor magnitude, float scale, float dropout, int seed, bool keep_output=True) -> Tensor");
  m.def(
      "dora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_R, "
      "Tensor magnitude, float scale, float dropout, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dora_linear_backward(Tensor grad, Tensor? x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor? lora_R, Tensor magnitude, Tensor? y, Tensor hr, Tensor norm, float scale, float dropout, int seed, "
      "bool[7] output_mask) -> Tensor[]");
  m.def(
      "lora_linear_grouped(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor group, "
      "float[] scales, float dropout, int seed) -> Tensor");
  m.def(
      "lora_linear_grouped_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor group, float[] scales, float dropout, int seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_grouped_backward(Tensor grad, Tensor? x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor group, Tensor hr, float[] scales, float dropout, int seed, bool[5] output_mask) -> Tensor[]");
  m.def(
      "lora_experts_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor offsets, "
      "float scale, float dropout, int seed) -> Tensor");
  m.def(
      "lora_experts_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor offsets, float scale, float dropout, int seed) -> (Tensor, Tensor)");
  m.def(
      "lora_experts_linear_backward(Tensor grad, Tensor? x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor offsets, Tensor hr, float scale, float dropout, int seed, bool[5] output_mask) -> Tensor[]");
  m.def("dora_norm(Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? lora_R, float scale) -> Tensor");
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  m.def("dropout_mask(Tensor x, float p, int seed) -> Tensor");
  m.def("lora_delta(Tensor lora_A, Tensor lora_B, Tensor? lora_R, float scale, ScalarType dtype) -> Tensor");
  m.def(
      "lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor? lora_R, float scale, bool safe) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "lora_unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor? lora_R, float scale, "
      "Tensor? distance, Tensor? index, Tensor? values) -> ()");
  m.def(
      "dora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor? lora_R, Tensor magnitude, float scale, "
      "bool safe) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dora_unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor? lora_R, Tensor magnitude, "
      "Tensor norm, float scale, Tensor? distance, Tensor? index, Tensor? values) -> ()");
  m.def("lora_gram(Tensor[] lora_A, Tensor[] lora_B, float[] scales) -> Tensor");
  m.def("lora_gram_modules(Tensor[] lora_A, Tensor[] lora_B, float[] scales, int checkpoints) -> Tensor");
  m.def("lora_factored_svd(Tensor[] lora_A, Tensor[] lora_B, float[] scales, int rank) -> (Tensor, Tensor, Tensor)");
  m.def("svd_lowrank(Tensor weight, int rank, int niter, int oversample=10, int seed=0) -> (Tensor, Tensor, Tensor)");
  m.def("blockwise_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("blockwise_dequantize(Tensor index, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");
  m.def("nf4_quantize(Tensor x, int blocksize=64) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int numel, int blocksize, ScalarType dtype) -> Tensor");
  // The vector unit the CPU kernels use (LISPETORCH_ISA caps it): "avx512", "avx2" or "aten".
  m.def("cpu_isa() -> str", []() -> std::string {
    switch (lispetorch::simd::isa()) {
      case lispetorch::simd::Isa::avx512: return "avx512";
      case lispetorch::simd::Isa::avx2: return "avx2";
      default: return "aten";
    }
  });
}
