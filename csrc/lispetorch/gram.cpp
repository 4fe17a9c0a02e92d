// Factored Gram of LoRA deltas: ⟨sᵢBᵢAᵢ, sⱼBⱼAⱼ⟩_F for k checkpoints of one module, without forming B A.
//
// Layout (row-major, PEFT orientation): checkpoint i has Aᵢ (rᵢ, in) and Bᵢ (out, rᵢ); ranks may differ.
// The factors are stacked once, in float64:
//   A = [A₁; …; A_k]   (R, in)      B = [B₁ | … | B_k]   (out, R)      R = Σ rᵢ
// Then  ⟨BᵢAᵢ, BⱼAⱼ⟩_F = tr(AᵢᵀBᵢᵀBⱼAⱼ) = sum((BᵢᵀBⱼ) ⊙ (AᵢAⱼᵀ)),  and (BᵢᵀBⱼ), (AᵢAⱼᵀ) are the (i, j) blocks of
// BᵀB and AAᵀ (both R×R). So the whole k×k Gram is two stacked products, one elementwise product, and a block
// sum written as Sᵀ (BᵀB ⊙ AAᵀ) S with S (R, k) holding sᵢ on the rows of block i. Cost O((in + out)·R²)
// instead of O(in·out·k). On CPU the two products come from gram_cpu.cpp, which reads the factors where they are
// (no stacked copy) and computes only the upper triangles; elsewhere (and on processors without AVX2) from ATen.
#include "lispetorch.h"

#include <ATen/ATen.h>

#include <cmath>

namespace lispetorch {
namespace detail {

std::vector<int64_t> check_stacked_factors(at::TensorList lora_A, at::TensorList lora_B,
                                           at::ArrayRef<double> scales) {
  const size_t k = lora_A.size();
  TORCH_CHECK(k > 0, "lora_A is an empty list: at least one checkpoint's factors are needed");
  TORCH_CHECK(lora_B.size() == k, "lora_A has ", k, " factors but lora_B has ", lora_B.size());
  TORCH_CHECK(scales.size() == k, "lora_A has ", k, " factors but scales has ", scales.size(), " values");
  std::vector<int64_t> ranks(k);
  const at::Tensor& A0 = lora_A[0];
  const at::Tensor& B0 = lora_B[0];
  TORCH_CHECK(A0.defined() && B0.defined(), "lora_A[0] or lora_B[0] is undefined");
  TORCH_CHECK(A0.dim() == 2, "lora_A[0] must be 2-D (r, in), got shape ", A0.sizes());
  TORCH_CHECK(B0.dim() == 2, "lora_B[0] must be 2-D (out, r), got shape ", B0.sizes());
  const int64_t in = A0.size(1), out = B0.size(0);
  for (size_t i = 0; i < k; ++i) {
    const at::Tensor& A = lora_A[i];
    const at::Tensor& B = lora_B[i];
    TORCH_CHECK(A.defined() && B.defined(), "lora_A[", i, "] or lora_B[", i, "] is undefined");
    TORCH_CHECK(at::isFloatingType(A.scalar_type()) && at::isFloatingType(B.scalar_type()), "lora_A[", i,
                "] and lora_B[", i, "] must be floating-point, got ", A.scalar_type(), " and ", B.scalar_type());
    TORCH_CHECK(A.dim() == 2, "lora_A[", i, "] must be 2-D (r, in), got shape ", A.sizes());
    TORCH_CHECK(B.dim() == 2, "lora_B[", i, "] must be 2-D (out, r), got shape ", B.sizes());
    TORCH_CHECK(A.size(0) > 0, "lora_A[", i, "] has rank 0 (shape ", A.sizes(), ")");
    TORCH_CHECK(A.size(1) == in, "lora_A[", i, "] has ", A.size(1), " columns but lora_A[0] has ", in,
                " (shapes ", A.sizes(), " and ", A0.sizes(), ")");
    TORCH_CHECK(B.size(0) == out, "lora_B[", i, "] has ", B.size(0), " rows but lora_B[0] has ", out, " (shapes ",
                B.sizes(), " and ", B0.sizes(), ")");
    TORCH_CHECK(B.size(1) == A.size(0), "lora_B[", i, "] has ", B.size(1), " columns but lora_A[", i,
                "] has rank ", A.size(0), " (lora_B ", B.sizes(), ", lora_A ", A.sizes(), ")");
    TORCH_CHECK(A.device() == A0.device() && B.device() == A0.device(), "lora_A[0] is on ", A0.device(),
                " but lora_A[", i, "] is on ", A.device(), " and lora_B[", i, "] on ", B.device());
    TORCH_CHECK(std::isfinite(scales[i]), "scales[", i, "] must be finite, got ", scales[i]);
    ranks[i] = A.size(0);
  }
  return ranks;
}

std::pair<at::Tensor, at::Tensor> stack_factors(at::TensorList lora_A, at::TensorList lora_B,
                                                const std::vector<int64_t>& ranks, at::ArrayRef<double> scales_B) {
  int64_t R = 0;
  for (int64_t r : ranks) R += r;
  const auto opts = lora_A[0].options().dtype(at::kDouble);
  at::Tensor A = at::empty({R, lora_A[0].size(1)}, opts);  // (R, in)
  at::Tensor B = at::empty({lora_B[0].size(0), R}, opts);  // (out, R)
  int64_t off = 0;
  for (size_t i = 0; i < ranks.size(); ++i) {
    A.narrow(0, off, ranks[i]).copy_(lora_A[i]);
    at::Tensor b = B.narrow(1, off, ranks[i]);
    b.copy_(lora_B[i]);
    if (!scales_B.empty() && scales_B[i] != 1.0) b.mul_(scales_B[i]);
    off += ranks[i];
  }
  return {A, B};
}

}  // namespace detail

at::Tensor lora_gram(at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scales) {
  const std::vector<int64_t> ranks = detail::check_stacked_factors(lora_A, lora_B, scales);
  if (detail::gram_cpu_available(lora_A, lora_B)) return detail::lora_grams_cpu(lora_A, lora_B, scales, {ranks})[0];
  const int64_t k = static_cast<int64_t>(ranks.size());
  auto [A, B] = detail::stack_factors(lora_A, lora_B, ranks, {});          // (R, in), (out, R)
  at::Tensor H = at::mm(A, A.t());                                           // (R, R): blocks AᵢAⱼᵀ
  H.mul_(at::mm(B.t(), B));                                                  // ⊙ blocks BᵢᵀBⱼ
  at::Tensor S = at::zeros({H.size(0), k}, H.options());                     // (R, k) block selector × sᵢ
  int64_t off = 0;
  for (int64_t i = 0; i < k; ++i) {
    S.narrow(0, off, ranks[i]).select(1, i).fill_(scales[i]);
    off += ranks[i];
  }
  at::Tensor G = at::mm(S.t(), at::mm(H, S));                                // (k, k)
  return G.add(G.t()).mul_(0.5);                                             // exactly symmetric
}

at::Tensor lora_gram_modules(at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scales,
                             int64_t checkpoints) {
  const int64_t k = checkpoints;
  const int64_t n = static_cast<int64_t>(lora_A.size());
  TORCH_CHECK(k > 0, "checkpoints must be positive, got ", k);
  TORCH_CHECK(n % k == 0, "lora_A has ", n, " factors, not a multiple of checkpoints = ", k);
  TORCH_CHECK(static_cast<int64_t>(lora_B.size()) == n && static_cast<int64_t>(scales.size()) == n, "lora_A has ",
              n, " factors but lora_B has ", lora_B.size(), " and scales ", scales.size());
  const int64_t M = n / k;
  std::vector<std::vector<int64_t>> ranks(M);
  for (int64_t m = 0; m < M; ++m) {
    try {
      ranks[m] = detail::check_stacked_factors(lora_A.slice(m * k, k), lora_B.slice(m * k, k),
                                               scales.slice(m * k, k));
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "module ", m, " (list entries ", m * k, " to ", m * k + k - 1, "): ", e.msg());
    }
  }
  if (M > 0 && detail::gram_cpu_available(lora_A, lora_B)) return detail::lora_grams_cpu(lora_A, lora_B, scales, ranks);
  std::vector<at::Tensor> grams;
  for (int64_t m = 0; m < M; ++m)
    grams.push_back(lora_gram(lora_A.slice(m * k, k), lora_B.slice(m * k, k), scales.slice(m * k, k)));
  return M > 0 ? at::stack(grams) : at::empty({0, k, k}, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace lispetorch

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_gram", &lispetorch::lora_gram);
  m.impl("lora_gram_modules", &lispetorch::lora_gram_modules);
}
