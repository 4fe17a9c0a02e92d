// Forward and backward kernels of the fused low-rank linear, composed from ATen calls (any device).
//
//   y  = x Wᵀ + b + s · hr Bᵀ,   h = drop(x) Aᵀ  (N, r),   hr = h Rᵀ (N, r; hr = h without R)
//
// Forward keeps only hr (N×r) besides the inputs; backward regenerates drop(x) from the seed.
#include "lispetorch.h"

#include <ATen/ATen.h>

namespace lispetorch::detail {

namespace {
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, double scale, double dropout, int64_t seed) {
  check_lora_inputs(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout);
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, in});                                   // (N, in)
  at::Tensor y = has(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());  // (N, out)
  const at::Tensor xd = dropout > 0.0 ? lispetorch::dropout(x2, dropout, seed) : x2;     // (N, in)
  at::Tensor hr = at::mm(xd, lora_A.t());                                      // (N, r)
  if (has(lora_R)) hr = at::mm(hr, lora_R->t());                               // (N, r)
  y.addmm_(hr, lora_B.t(), /*beta=*/1.0, /*alpha=*/scale);                     // += s · hr Bᵀ
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  return {y.view(sizes), hr};
}

std::vector<at::Tensor> lora_linear_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, const at::Tensor& hr, double scale,
    double dropout, int64_t seed, std::array<bool, 6> output_mask) {
  const auto [need_x, need_w, need_b, need_A, need_B, need_R] = output_mask;
  const bool with_R = has(lora_R);
  check_factors(weight, lora_A, lora_B, lora_R, scale);
  TORCH_CHECK(grad.size(-1) == weight.size(0), "grad_output has ", grad.size(-1), " features (shape ", grad.sizes(),
              ") but weight has ", weight.size(0), " outputs");
  TORCH_CHECK(!(need_R && !with_R), "gradient of lora_R requested but lora_R is absent");
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor g2 = grad.reshape({-1, out});  // (N, out)
  const int64_t n = g2.size(0);
  TORCH_CHECK(hr.dim() == 2 && hr.size(0) == n && hr.size(1) == lora_A.size(0), "saved hr has shape ", hr.sizes(),
              " but grad_output has ", n, " rows and the rank is ", lora_A.size(0));
  const bool need_xd = need_A || need_R || need_w;
  TORCH_CHECK(!need_xd || has(x), "the layer input is needed for the requested gradients but was not given");
  at::Tensor x2 = need_xd ? x->reshape({-1, in}) : at::Tensor();             // (N, in)
  TORCH_CHECK(!need_xd || x2.size(0) == n, "input has ", x2.size(0), " rows but grad_output has ", n);

  std::vector<at::Tensor> grads;
  at::Tensor ghr, gh;  // dL/dhr, dL/dh (N, r)
  if (need_x || need_A || need_R) {
    ghr = at::mm(g2, lora_B).mul_(scale);                                       // (N, r)
    gh = with_R ? at::mm(ghr, *lora_R) : ghr;                                   // (N, r)
  }
  // gx starts as the adapter's part, dL/dh A (N, in), and takes the dropout mask; drop(x) feeds the gradients of
  // A and R. Where both are needed, one pass draws the mask for the two.
  at::Tensor gx = need_x ? at::mm(gh, lora_A) : at::Tensor();                  // (N, in), contiguous
  at::Tensor xd;
  const bool need_xd_AR = need_A || need_R;
  if (dropout > 0.0) {
    if (need_xd_AR && need_x) {
      xd = dropout_pair_(x2, gx, dropout, seed);
    } else if (need_xd_AR) {
      xd = lispetorch::dropout(x2, dropout, seed);
    } else if (need_x) {
      dropout_inplace_(gx, dropout, seed);
    }
  } else if (need_xd_AR) {
    xd = x2;
  }
  at::Tensor grad_R;
  if (need_R) grad_R = at::mm(ghr.t(), at::mm(xd, lora_A.t()));               // (r, r) = dL/dhrᵀ h

  if (need_x) {
    gx.addmm_(g2, weight);                                                      // += g Wᵀᵀ
    std::vector<int64_t> sizes = grad.sizes().vec();
    sizes.back() = in;
    grads.push_back(gx.view(sizes));
  }
  if (need_w) grads.push_back(at::mm(g2.t(), x2));                              // (out, in)
  if (need_b) grads.push_back(g2.sum(0));                                       // (out)
  if (need_A) grads.push_back(at::mm(gh.t(), xd));                              // (r, in)
  // (out, r) = s · gᵀ hr, computed as (hrᵀ g)ᵀ: the product with g's rows along the long side is the faster
  if (need_B) grads.push_back(at::mm(hr.t(), g2).mul_(scale).t().contiguous());
  if (need_R) grads.push_back(grad_R);
  return grads;
}

}  // namespace lispetorch::detail

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_linear_forward", &lispetorch::detail::lora_linear_forward);
  m.impl("lora_linear_backward", &lispetorch::detail::lora_linear_backward);
}
