// Randomised truncated SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1), for SVD initialisations
// (PiSSA's "pissa_niter_K") of a weight W (out, in), row-major.
//
//   Ω (in, q) standard normal from a generator seeded with `seed`, q = min(rank + oversample, out, in)
//   Q = qr(W Ω)                                    (out, q), orthonormal basis of the range
//   niter times: Q = qr(W qr(Wᵀ Q))               subspace (power) iterations, re-orthonormalised each half-step
//   U_b S Vᵀ = svd(Qᵀ W)  (q, in);  U = Q U_b     then the top `rank` triplets are returned
//
// Computed in float32 (float64 stays float64); Ω is drawn on the CPU so results do not depend on the device's
// generator, then moved to W's device.
#include "lispetorch.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

namespace lispetorch {

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_lowrank(const at::Tensor& weight, int64_t rank, int64_t niter,
                                                           int64_t oversample, int64_t seed) {
  TORCH_CHECK(weight.defined() && weight.dim() == 2, "svd_lowrank: weight must be 2-D (out, in), got shape ",
              weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "svd_lowrank: weight must be floating point, got ",
              weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(rank > 0 && rank <= std::min(out, in), "svd_lowrank: rank must be in [1, min(out, in)] = [1, ",
              std::min(out, in), "] for weight ", weight.sizes(), ", got ", rank);
  TORCH_CHECK(niter >= 0, "svd_lowrank: niter must be >= 0, got ", niter);
  TORCH_CHECK(oversample >= 0, "svd_lowrank: oversample must be >= 0, got ", oversample);
  const at::ScalarType dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor W = weight.to(dtype);
  const int64_t q = std::min(rank + oversample, std::min(out, in));
  at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
  const at::Tensor omega = at::randn({in, q}, gen, at::TensorOptions().dtype(dtype)).to(W.device());  // (in, q)
  at::Tensor Q = std::get<0>(at::linalg_qr(at::mm(W, omega)));                                         // (out, q)
  for (int64_t i = 0; i < niter; ++i) {
    const at::Tensor Z = std::get<0>(at::linalg_qr(at::mm(W.t(), Q)));                                // (in, q)
    Q = std::get<0>(at::linalg_qr(at::mm(W, Z)));                                                      // (out, q)
  }
  auto [Ub, S, Vh] = at::linalg_svd(at::mm(Q.t(), W), /*full_matrices=*/false);                       // (q, in)
  const at::Tensor U = at::mm(Q, Ub);                                                                  // (out, q)
  return {U.narrow(1, 0, rank).contiguous(), S.narrow(0, 0, rank).contiguous(),
          Vh.narrow(0, 0, rank).contiguous()};
}

}  // namespace lispetorch

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) { m.impl("svd_lowrank", &lispetorch::svd_lowrank); }
