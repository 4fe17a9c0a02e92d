// The fused low-rank linear over a mixture of experts, one adapter per expert (LoRA on MoE experts):
//
//   y = x W_eᵀ + b_e + s · ((drop(x) A_eᵀ) B_eᵀ) on the rows routed to expert e,
//
// x (S, in) with its rows sorted by expert, offsets (E,) the cumulative end of each expert's rows (transformers'
// grouped-experts layout), W (E, out, in) (any strides: a transposed expert stack is passed as a view), b (E, out)
// optional, A (E, r, in), B (E, out, r). Each expert's rows are one contiguous block, so every product is a plain
// matrix product over a view, and only the routed tokens meet an expert's weight and adapter: no per-expert delta
// is ever formed. r = 0 is the base alone. The dropout mask is the counter-based one of the whole (S, in) input,
// regenerated in backward; what is saved is x and hr (S, r), as for one adapter.
#include "lispetorch.h"

#include <ATen/ATen.h>

namespace lispetorch::detail {

namespace {
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_experts(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                   const at::Tensor& lora_B, const at::Tensor& offsets) {
  TORCH_CHECK(weight.dim() == 3, "expert weight must be (E, out, in), got ", weight.sizes());
  const int64_t E = weight.size(0), out = weight.size(1), in = weight.size(2);
  TORCH_CHECK(lora_A.dim() == 3 && lora_B.dim() == 3 && lora_A.size(0) == E && lora_B.size(0) == E &&
                  lora_A.size(2) == in && lora_B.size(1) == out && lora_B.size(2) == lora_A.size(1),
              "expert factors do not fit: lora_A ", lora_A.sizes(), " and lora_B ", lora_B.sizes(),
              " for expert weight ", weight.sizes(), " (expected (E, r, in) and (E, out, r))");
  TORCH_CHECK(!has(bias) || (bias->dim() == 2 && bias->size(0) == E && bias->size(1) == out),
              "expert bias must be (", E, ", ", out, "), got ", bias->sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == E &&
                  (offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong),
              "offsets must be (", E, ",) int32 or int64, got ", offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(lora_A.scalar_type() == weight.scalar_type() && lora_B.scalar_type() == weight.scalar_type(),
              "expert factors must be in the weight's dtype ", weight.scalar_type());
}

// Each expert's rows [start, end), from the cumulative ends; they must rise to exactly `rows`.
std::vector<std::pair<int64_t, int64_t>> blocks(const at::Tensor& offsets, int64_t rows) {
  const at::Tensor ends = offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = ends.const_data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t start = 0;
  for (int64_t e = 0; e < ends.numel(); ++e) {
    TORCH_CHECK(p[e] >= start && p[e] <= rows, "offsets must rise from 0 to the number of rows ", rows,
                "; expert ", e, " ends at ", p[e], " after ", start);
    out.emplace_back(start, p[e]);
    start = p[e];
  }
  TORCH_CHECK(start == rows, "offsets end at ", start, " but the input has ", rows, " rows");
  return out;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_experts_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout, int64_t seed) {
  check_experts(weight, bias, lora_A, lora_B, offsets);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(2), "input must be (S, ", weight.size(2), "), got ",
              x.sizes());
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, "dropout must be in [0, 1), got ", dropout);
  const int64_t r = lora_A.size(1);
  const auto rows = blocks(offsets, x.size(0));
  at::Tensor y = at::empty({x.size(0), weight.size(1)}, x.options());
  at::Tensor hr = at::empty({x.size(0), r}, x.options());
  const at::Tensor xd = r > 0 && dropout > 0.0 ? lispetorch::dropout(x, dropout, seed) : x;
  for (size_t e = 0; e < rows.size(); ++e) {
    const auto [start, end] = rows[e];
    if (end == start) continue;
    at::Tensor ys = y.narrow(0, start, end - start);
    at::mm_out(ys, x.narrow(0, start, end - start), weight[e].t());
    if (has(bias)) ys.add_((*bias)[e]);
    if (r == 0) continue;
    at::Tensor h = hr.narrow(0, start, end - start);
    at::mm_out(h, xd.narrow(0, start, end - start), lora_A[e].t());  // (n_e, r)
    ys.addmm_(h, lora_B[e].t(), 1.0, scale);
  }
  return {y, hr};
}

std::vector<at::Tensor> lora_experts_linear_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& offsets, const at::Tensor& hr, double scale, double dropout,
    int64_t seed, std::array<bool, 5> output_mask) {
  const auto [need_x, need_w, need_b, need_A, need_B] = output_mask;
  check_experts(weight, std::nullopt, lora_A, lora_B, offsets);
  const int64_t r = lora_A.size(1);
  const auto rows = blocks(offsets, grad.size(0));
  TORCH_CHECK(!(need_A || need_w) || has(x), "the layer input is needed for the requested gradients but was not "
              "given");
  at::Tensor xd;
  if (need_A && r > 0) xd = dropout > 0.0 ? lispetorch::dropout(*x, dropout, seed) : *x;
  at::Tensor gx = need_x ? at::zeros({grad.size(0), weight.size(2)}, grad.options()) : at::Tensor();
  at::Tensor grad_w = need_w ? at::zeros(weight.sizes(), weight.options()) : at::Tensor();
  at::Tensor grad_b = need_b ? at::zeros({weight.size(0), weight.size(1)}, grad.options()) : at::Tensor();
  at::Tensor grad_A = need_A ? at::zeros_like(lora_A) : at::Tensor();
  at::Tensor grad_B = need_B ? at::zeros_like(lora_B) : at::Tensor();
  for (size_t e = 0; e < rows.size(); ++e) {
    const auto [start, end] = rows[e];
    if (end == start) continue;
    const int64_t n = end - start;
    const at::Tensor gs = grad.narrow(0, start, n);                              // (n_e, out)
    if (r > 0 && (need_x || need_A)) {
      const at::Tensor gh = at::mm(gs, lora_B[e]).mul_(scale);                  // (n_e, r)
      if (need_x) {
        at::Tensor gxs = gx.narrow(0, start, n);
        at::mm_out(gxs, gh, lora_A[e]);
      }
      if (need_A) grad_A[e].copy_(at::mm(gh.t(), xd.narrow(0, start, n)));
    }
    if (r > 0 && need_B) grad_B[e].copy_(at::mm(hr.narrow(0, start, n).t(), gs).mul_(scale).t());  // (hrᵀ g)ᵀ
    if (need_w) grad_w[e].copy_(at::mm(gs.t(), x->narrow(0, start, n)));
    if (need_b) grad_b[e].copy_(gs.sum(0));
  }
  std::vector<at::Tensor> grads;
  if (need_x) {
    if (r > 0 && dropout > 0.0) dropout_inplace_(gx, dropout, seed);  // the adapter's part only, then the base's
    for (size_t e = 0; e < rows.size(); ++e) {
      const auto [start, end] = rows[e];
      if (end == start) continue;
      gx.narrow(0, start, end - start).addmm_(grad.narrow(0, start, end - start), weight[e]);
    }
    grads.push_back(gx);
  }
  if (need_w) grads.push_back(grad_w);
  if (need_b) grads.push_back(grad_b);
  if (need_A) grads.push_back(grad_A);
  if (need_B) grads.push_back(grad_B);
  return grads;
}

}  // namespace lispetorch::detail

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_experts_linear_forward", &lispetorch::detail::lora_experts_linear_forward);
  m.impl("lora_experts_linear_backward", &lispetorch::detail::lora_experts_linear_backward);
}
