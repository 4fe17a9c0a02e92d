// Forward and backward kernels of the fused low-rank linear, composed from ATen calls (any device).
//
//   y  = x Wᵀ + b + s · hr Bᵀ,   h = drop(x) Aᵀ  (N, r),   hr = h Rᵀ (N, r; hr = h without R)
//
// Forward keeps only hr (N×r) besides the inputs; backward regenerates drop(x) from the seed.
//
// On CPU both run over blocks of rows sized to stay in the L2 cache: each block's base product, its dropped
// input (drawn into a reused buffer, never a whole (N, in) copy), its adapter products and, in backward, the
// masked adapter part of dL/dx are done while the block is in cache. Over the whole input the adapter then reads
// x and the output gradient once more than the frozen layer does, where the unblocked composition writes and
// reads several (N, in) and (N, out) intermediates.
#include "lispetorch.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace lispetorch::detail {

namespace {
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Rows per block: about 256 KiB of the widest of (in, out), between 32 and 1024 rows.
int64_t block_rows(int64_t in, int64_t out) {
  return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(1, std::max(in, out)), 32, 1024);
}

bool blocked(const at::Tensor& x2) { return x2.device().is_cpu() && x2.is_contiguous(); }

// Forward over row blocks (CPU): y = x Wᵀ + b + s · hr Bᵀ, hr = drop(x) Aᵀ Rᵀ.
void forward_blocks(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                    double scale, double dropout, int64_t seed, at::Tensor& y, at::Tensor& hr) {
  const int64_t n = x2.size(0), in = x2.size(1), nb = block_rows(in, weight.size(0));
  const at::Tensor Wt = weight.t(), At = lora_A.t(), Bt = lora_B.t();
  at::Tensor buffer = dropout > 0.0 ? at::empty({std::min(n, nb), in}, x2.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += nb) {
    const int64_t rows = std::min(nb, n - r0);
    const at::Tensor xb = x2.narrow(0, r0, rows);
    at::Tensor yb = y.narrow(0, r0, rows), hb = hr.narrow(0, r0, rows);
    if (has(bias)) {
      at::addmm_out(yb, *bias, xb, Wt);
    } else {
      at::mm_out(yb, xb, Wt);
    }
    at::Tensor xdb = xb;
    if (dropout > 0.0) {
      xdb = buffer.narrow(0, 0, rows);
      dropout_block_(xb, xdb, dropout, seed, r0 * in);
    }
    if (has(lora_R)) {
      at::mm_out(hb, at::mm(xdb, At), lora_R->t());
    } else {
      at::mm_out(hb, xdb, At);
    }
    yb.addmm_(hb, Bt, /*beta=*/1.0, /*alpha=*/scale);
  }
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, double scale, double dropout, int64_t seed) {
  check_lora_inputs(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout);
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, in});                                   // (N, in)
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  if (blocked(x2)) {
    at::Tensor y = at::empty({x2.size(0), out}, x2.options());
    at::Tensor hr = at::empty({x2.size(0), lora_A.size(0)}, x2.options());
    forward_blocks(x2, weight, bias, lora_A, lora_B, lora_R, scale, dropout, seed, y, hr);
    return {y.view(sizes), hr};
  }
  at::Tensor y = has(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());  // (N, out)
  const at::Tensor xd = dropout > 0.0 ? lispetorch::dropout(x2, dropout, seed) : x2;     // (N, in)
  at::Tensor hr = at::mm(xd, lora_A.t());                                      // (N, r)
  if (has(lora_R)) hr = at::mm(hr, lora_R->t());                               // (N, r)
  y.addmm_(hr, lora_B.t(), /*beta=*/1.0, /*alpha=*/scale);                     // += s · hr Bᵀ
  return {y.view(sizes), hr};
}

namespace {
// Backward over row blocks (CPU), the gradients in lora_linear_backward's order. Per block: dL/dhr = s·G B and
// dL/dh = dL/dhr R; dL/dx = G W + drop(dL/dh A); drop(x) into a reused buffer for the gradients of A and R; dL/dB
// accumulates s·Gᵀ hr while G is in cache.
std::vector<at::Tensor> backward_blocks(const at::Tensor& grad, const at::Tensor& g2, const at::Tensor& x2,
                                        const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                        const std::optional<at::Tensor>& lora_R, const at::Tensor& hr, double scale,
                                        double dropout, int64_t seed, std::array<bool, 6> output_mask) {
  const auto [need_x, need_w, need_b, need_A, need_B, need_R] = output_mask;
  const int64_t n = g2.size(0), out = g2.size(1), in = weight.size(1), r = lora_A.size(0);
  const int64_t nb = block_rows(in, out);
  const bool with_R = has(lora_R), need_h = need_x || need_A || need_R, need_xd = need_A || need_R;
  const at::TensorOptions opts = g2.options();
  at::Tensor gx = need_x ? at::empty({n, in}, opts) : at::Tensor();
  at::Tensor grad_A = need_A ? at::zeros({r, in}, opts) : at::Tensor();
  at::Tensor grad_B = need_B ? at::zeros({out, r}, opts) : at::Tensor();
  at::Tensor grad_R = need_R ? at::zeros({r, r}, opts) : at::Tensor();
  at::Tensor xd_buffer = need_xd && dropout > 0.0 ? at::empty({std::min(n, nb), in}, opts) : at::Tensor();
  at::Tensor t_buffer = need_x ? at::empty({std::min(n, nb), in}, opts) : at::Tensor();
  const at::Tensor At = lora_A.t();
  for (int64_t r0 = 0; r0 < n; r0 += nb) {
    const int64_t rows = std::min(nb, n - r0);
    const at::Tensor gb = g2.narrow(0, r0, rows);
    at::Tensor ghr, gh;  // (rows, r)
    if (need_h) {
      ghr = at::mm(gb, lora_B).mul_(scale);
      gh = with_R ? at::mm(ghr, *lora_R) : ghr;
    }
    if (need_B) grad_B.addmm_(gb.t(), hr.narrow(0, r0, rows), /*beta=*/1.0, /*alpha=*/scale);
    at::Tensor xdb;
    if (need_xd) {
      xdb = x2.narrow(0, r0, rows);
    }
    if (need_x) {
      at::Tensor gxb = gx.narrow(0, r0, rows), tb = t_buffer.narrow(0, 0, rows);
      at::mm_out(gxb, gb, weight);                                               // G W, the frozen layer's
      at::mm_out(tb, gh, lora_A);                                                // dL/dh A
      if (dropout > 0.0) {
        at::Tensor xdo;
        if (need_xd) xdo = xd_buffer.narrow(0, 0, rows);
        dropout_pair_add_(xdb, need_xd ? &xdo : nullptr, tb, gxb, dropout, seed, r0 * in);
        if (need_xd) xdb = xdo;
      } else {
        gxb.add_(tb);
      }
    } else if (need_xd && dropout > 0.0) {
      at::Tensor xdo = xd_buffer.narrow(0, 0, rows);
      dropout_block_(xdb, xdo, dropout, seed, r0 * in);
      xdb = xdo;
    }
    if (need_A) grad_A.addmm_(gh.t(), xdb);
    if (need_R) grad_R.addmm_(ghr.t(), at::mm(xdb, At));
  }
  std::vector<at::Tensor> grads;
  if (need_x) {
    std::vector<int64_t> sizes = grad.sizes().vec();
    sizes.back() = in;
    grads.push_back(gx.view(sizes));
  }
  if (need_w) grads.push_back(at::mm(g2.t(), x2));
  if (need_b) grads.push_back(g2.sum(0));
  if (need_A) grads.push_back(grad_A);
  if (need_B) grads.push_back(grad_B);
  if (need_R) grads.push_back(grad_R);
  return grads;
}
}  // namespace

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

  if (blocked(g2) && (!need_xd || x2.is_contiguous())) {
    return backward_blocks(grad, g2, x2, weight, lora_A, lora_B, lora_R, hr, scale, dropout, seed, output_mask);
  }
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
  if (need_B) grads.push_back(at::mm(g2.t(), hr).mul_(scale));                  // (out, r)
  if (need_R) grads.push_back(grad_R);
  return grads;
}

}  // namespace lispetorch::detail

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_linear_forward", &lispetorch::detail::lora_linear_forward);
  m.impl("lora_linear_backward", &lispetorch::detail::lora_linear_backward);
}
