// The fused low-rank linear with one adapter per group of rows (mixed-adapter batches):
//
//   y = x Wᵀ + b + Σ_g s_g · ((drop(x) A_gᵀ) B_gᵀ) on the rows whose group is g,
//
// A (G, r, in), B (G, out, r) stacked (a smaller rank padded with zeros adds nothing), group (N,) int64 per row of
// x viewed as (N, in), −1 for the base alone. One base product over all rows, then per group present the rows are
// gathered, their adapter products computed and added back; backward the same per group, so each adapter's
// gradient comes from its own rows only. The dropout mask is the counter-based one of the whole (N, in) input,
// regenerated in backward; what is saved is x and hr (N, r) as for one adapter.
#include "lispetorch.h"

#include <ATen/ATen.h>

namespace lispetorch::detail {

namespace {
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_grouped(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const at::Tensor& group, at::ArrayRef<double> scales, int64_t rows) {
  TORCH_CHECK(lora_A.dim() == 3 && lora_B.dim() == 3, "grouped lora_A must be (G, r, in) and lora_B (G, out, r), "
              "got ", lora_A.sizes(), " and ", lora_B.sizes());
  const int64_t G = lora_A.size(0);
  TORCH_CHECK(lora_B.size(0) == G && lora_A.size(2) == weight.size(1) && lora_B.size(1) == weight.size(0) &&
                  lora_B.size(2) == lora_A.size(1),
              "grouped factors do not fit: lora_A ", lora_A.sizes(), ", lora_B ", lora_B.sizes(), ", weight ",
              weight.sizes());
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == G, "one scale per group: ", G, " groups, ", scales.size(),
              " scales");
  TORCH_CHECK(group.dim() == 1 && group.size(0) == rows && group.scalar_type() == at::kLong, "group must be (",
              rows, ",) int64, got ", group.scalar_type(), " ", group.sizes());
  TORCH_CHECK(lora_A.scalar_type() == weight.scalar_type() && lora_B.scalar_type() == weight.scalar_type(),
              "grouped factors must be in the weight's dtype ", weight.scalar_type());
}

// The rows of each group present, as index tensors (group g ↦ rows), in ascending g.
std::vector<std::pair<int64_t, at::Tensor>> rows_by_group(const at::Tensor& group, int64_t G) {
  std::vector<std::pair<int64_t, at::Tensor>> out;
  const at::Tensor present = std::get<0>(at::_unique(group.cpu()));
  const int64_t* p = present.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < present.numel(); ++k) {
    const int64_t g = p[k];
    if (g < 0) continue;
    TORCH_CHECK(g < G, "group index ", g, " out of range for ", G, " groups");
    out.emplace_back(g, group.eq(g).nonzero().flatten());
  }
  return out;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_grouped_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& group, at::ArrayRef<double> scales, double dropout, int64_t seed) {
  TORCH_CHECK(x.size(-1) == weight.size(1), "input has ", x.size(-1), " features but weight expects ",
              weight.size(1));
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_A.size(1);
  const at::Tensor x2 = x.reshape({-1, in});
  check_grouped(weight, lora_A, lora_B, group, scales, x2.size(0));
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, "dropout must be in [0, 1), got ", dropout);
  at::Tensor y = has(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor hr = at::zeros({x2.size(0), r}, x2.options());
  const auto groups = rows_by_group(group, lora_A.size(0));
  if (!groups.empty()) {
    const at::Tensor xd = dropout > 0.0 ? lispetorch::dropout(x2, dropout, seed) : x2;
    for (const auto& [g, rows] : groups) {
      const at::Tensor h = at::mm(xd.index_select(0, rows), lora_A[g].t());     // (n_g, r)
      hr.index_copy_(0, rows, h);
      y.index_add_(0, rows, at::mm(h, lora_B[g].t()), scales[g]);
    }
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  return {y.view(sizes), hr};
}

std::vector<at::Tensor> lora_linear_grouped_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& group, const at::Tensor& hr, at::ArrayRef<double> scales,
    double dropout, int64_t seed, std::array<bool, 5> output_mask) {
  const auto [need_x, need_w, need_b, need_A, need_B] = output_mask;
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor g2 = grad.reshape({-1, out});
  check_grouped(weight, lora_A, lora_B, group, scales, g2.size(0));
  const bool need_xd = need_A || need_w;
  TORCH_CHECK(!need_xd || has(x), "the layer input is needed for the requested gradients but was not given");
  const at::Tensor x2 = need_xd ? x->reshape({-1, in}) : at::Tensor();
  const auto groups = rows_by_group(group, lora_A.size(0));
  at::Tensor xd;
  if (need_A && !groups.empty()) xd = dropout > 0.0 ? lispetorch::dropout(x2, dropout, seed) : x2;
  at::Tensor gx_adapter = need_x ? at::zeros({g2.size(0), in}, g2.options()) : at::Tensor();
  at::Tensor grad_A = need_A ? at::zeros_like(lora_A) : at::Tensor();
  at::Tensor grad_B = need_B ? at::zeros_like(lora_B) : at::Tensor();
  for (const auto& [g, rows] : groups) {
    const at::Tensor gg = g2.index_select(0, rows);                               // (n_g, out)
    const double s = scales[g];
    if (need_x || need_A) {
      const at::Tensor gh = at::mm(gg, lora_B[g]).mul_(s);                        // (n_g, r)
      if (need_x) gx_adapter.index_add_(0, rows, at::mm(gh, lora_A[g]));
      if (need_A) grad_A[g].copy_(at::mm(gh.t(), xd.index_select(0, rows)));
    }
    if (need_B) grad_B[g].copy_(at::mm(hr.index_select(0, rows).t(), gg).mul_(s).t());  // (hrᵀ g)ᵀ
  }
  std::vector<at::Tensor> grads;
  if (need_x) {
    if (dropout > 0.0 && !groups.empty()) dropout_inplace_(gx_adapter, dropout, seed);
    gx_adapter.addmm_(g2, weight);
    std::vector<int64_t> sizes = grad.sizes().vec();
    sizes.back() = in;
    grads.push_back(gx_adapter.view(sizes));
  }
  if (need_w) grads.push_back(at::mm(g2.t(), x2));
  if (need_b) grads.push_back(g2.sum(0));
  if (need_A) grads.push_back(grad_A);
  if (need_B) grads.push_back(grad_B);
  return grads;
}

}  // namespace lispetorch::detail

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_linear_grouped_forward", &lispetorch::detail::lora_linear_grouped_forward);
  m.impl("lora_linear_grouped_backward", &lispetorch::detail::lora_linear_grouped_backward);
}
