// Truncated SVD of a weighted sum of LoRA deltas, Σᵢ sᵢBᵢAᵢ (out, in), without forming it.
//
// Stack the factors (see gram.cpp) with the scales folded into B:  ΔW = B A,  B = [s₁B₁ | …] (out, R),
// A = [A₁; …] (R, in). With thin QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A, ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ, and
// Q_B, Q_A have orthonormal columns, so the SVD of ΔW is Q_B U · Σ · (Q_A V)ᵀ with U Σ Vᵀ the SVD of the small
// core R_B R_Aᵀ (at most R×R). Keeping the top q singular triplets gives the best rank-q approximation in the
// Frobenius norm (Eckart–Young). Cost O((in + out)·R²); memory O((in + out)·R).
#include "lispetorch.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace lispetorch {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_factored_svd(at::TensorList lora_A, at::TensorList lora_B,
                                                                 at::ArrayRef<double> scales, int64_t rank) {
  const std::vector<int64_t> ranks = detail::check_stacked_factors(lora_A, lora_B, scales);
  TORCH_CHECK(rank > 0, "rank must be a positive integer, got ", rank);
  auto [A, B] = detail::stack_factors(lora_A, lora_B, ranks, scales);       // (R, in), (out, R) scaled
  auto [QB, RB] = at::linalg_qr(B);                                          // (out, p), (p, R)
  auto [QA, RA] = at::linalg_qr(A.t());                                      // (in, p'), (p', R)
  const at::Tensor core = at::mm(RB, RA.t());                                // (p, p')
  auto [U, S, Vh] = at::linalg_svd(core, /*full_matrices=*/false);          // (p, q0), (q0), (q0, p')
  const int64_t q = std::min<int64_t>(rank, S.size(0));
  const at::Tensor root = S.narrow(0, 0, q).sqrt();                          // (q) split √σ to each side
  at::Tensor B_out = at::mm(QB, U.narrow(1, 0, q)).mul_(root);               // (out, q)
  at::Tensor A_out = at::mm(Vh.narrow(0, 0, q), QA.t()).mul_(root.unsqueeze(1));  // (q, in)
  return {B_out, A_out, S};
}

}  // namespace lispetorch

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_factored_svd", &lispetorch::lora_factored_svd);
}
