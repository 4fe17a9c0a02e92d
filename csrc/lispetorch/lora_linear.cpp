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

// The largest rank the skinny kernels take: above it the products are no longer skinny and BLAS is the faster.
constexpr int64_t kSkinnyMaxRank = 64;
// The fewest rows they take: below it (decoding a few tokens) packing the factors costs more than the products,
// and ATen's small products on the factors as they are win (a one-token forward of a 512 → 512 layer, r 16, among
// other layers' calls: 55 µs against 86 µs).
constexpr int64_t kSkinnyMinRows = 16;

// Whether the CPU float32 kernels of skinny_cpu.cpp run this layer: no R, a rank up to kSkinnyMaxRank, at least
// kSkinnyMinRows rows, and the operands as skinny_available takes them (rows × in the input's elements, which the
// mask indexes).
bool skinny(at::TensorList operands, int64_t rows, int64_t in, const at::Tensor& lora_A,
            const std::optional<at::Tensor>& lora_R) {
  return !has(lora_R) && lora_A.size(0) <= kSkinnyMaxRank && rows >= kSkinnyMinRows &&
         skinny_available(operands, rows, in);
}

// A factor laid out for the kernels: s · t (K, r) as (K, skinny_pad(r)), zero columns after r.
at::Tensor pack_columns(const at::Tensor& t, double s) { return skinny_pack(t, t.size(0), skinny_pad(t.size(1)), s); }
// t (r, K) as (skinny_pad(r), K), zero rows after r.
at::Tensor pack_rows(const at::Tensor& t) {
  const int64_t r = t.size(0), rp = skinny_pad(r);
  return r == rp && t.is_contiguous() ? t : skinny_pack(t, rp, t.size(1), 1.0);
}

// Forward on the skinny kernels: hr = drop(x) Aᵀ in one pass over x, y = b + s·hr Bᵀ, then the frozen product
// accumulated into y by BLAS.
std::tuple<at::Tensor, at::Tensor> skinny_forward(const at::Tensor& x2, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                  const at::Tensor& lora_B, double scale, double dropout,
                                                  int64_t seed) {
  const int64_t r = lora_A.size(0);
  const at::Tensor hr = skinny_rows_panel(x2, pack_columns(lora_A.t(), 1.0), r, dropout, seed);  // (N, r)
  at::Tensor y = skinny_small_rows(hr, skinny_pack(lora_B.t(), r, lora_B.size(0), scale), bias);   // (N, out)
  y.addmm_(x2, weight.t());
  return {y, hr};
}

}  // namespace

at::Tensor merged_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                          double scale, const at::Tensor& row_scale) {
  constexpr int64_t kBlock = 1 << 20;  // elements of the sum formed at a time (4 MiB in float32)
  const int64_t out = weight.size(0), in = weight.size(1);
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor C = has(lora_R) ? at::mm(lora_B, *lora_R) : lora_B;  // (out, r)
  // the small-rows kernel, W's rows as the sum's start, where W and C are laid out for it; else ATen's addmm
  const bool kernel = weight.is_contiguous() && C.is_contiguous() && C.size(1) <= kSkinnyMaxRank;
  const at::Tensor sA = kernel ? skinny_pack(lora_A, lora_A.size(0), in, scale) : at::Tensor();  // s·A
  at::Tensor y = at::empty({x2.size(0), out}, x2.options());
  const int64_t rows = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, in));
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t r1 = std::min(out, r0 + rows);
    const at::Tensor wr = weight.slice(0, r0, r1), Cr = C.slice(0, r0, r1);
    at::Tensor w = kernel ? skinny_small_rows(Cr, sA, std::nullopt, wr) : at::addmm(wr, Cr, lora_A, 1.0, scale);
    if (row_scale.defined()) w.mul_(row_scale.slice(0, r0, r1).unsqueeze(1));
    at::Tensor block = y.slice(1, r0, r1);  // (N, rows), rows out apart: BLAS writes it in place
    if (has(bias)) {
      at::addmm_out(block, bias->slice(0, r0, r1), x2, w.t());
    } else {
      at::mm_out(block, x2, w.t());
    }
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  return y.view(sizes);
}

bool merges_for_inference(at::TensorList operands, const at::Tensor& x, const at::Tensor& weight, double dropout) {
  // The sum costs a product of out·in·r and the adapter's on the tokens rows·(in + out)·r, but the latter is in the
  // skinny kernels and the former also a pass over W: measured (512 → 512, r 16) the sum wins from about three times
  // the FLOPs on (rows 1024: 191–220 µs above the plain layer against 243–284; rows 512: 160–176 against 153).
  const int64_t out = weight.size(0), in = weight.size(1), rows = in > 0 ? x.numel() / in : 0;
  return dropout == 0.0 && rows > 0 && rows * (in + out) >= 3 * in * out && skinny_available(operands, rows, in);
}

std::optional<at::Tensor> lora_linear_merged(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                                             double scale, double dropout) {
  check_lora_inputs(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout);
  if (!merges_for_inference({x, weight, lora_A, lora_B, lora_R.value_or(at::Tensor()), bias.value_or(at::Tensor())},
                            x, weight, dropout)) {
    return std::nullopt;
  }
  return merged_product(x, weight, bias, lora_A, lora_B, lora_R, scale, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, double scale, double dropout, int64_t seed) {
  check_lora_inputs(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout);
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, in});                                   // (N, in)
  if (skinny({x2, weight, lora_A, lora_B, bias.value_or(at::Tensor())}, x2.size(0), in, lora_A, lora_R)) {
    auto [y, hr] = skinny_forward(x2.contiguous(), weight, bias, lora_A, lora_B, scale, dropout, seed);
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = out;
    return {y.view(sizes), hr};
  }
  at::Tensor y = has(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());  // (N, out)
  const at::Tensor xd = dropout > 0.0 ? lispetorch::dropout(x2, dropout, seed) : x2;     // (N, in)
  at::Tensor hr = at::mm(xd, lora_A.t());                                      // (N, r)
  if (has(lora_R)) hr = at::mm(hr, lora_R->t());                               // (N, r)
  y.addmm_(hr, lora_B.t(), /*beta=*/1.0, /*alpha=*/scale);                     // += s · hr Bᵀ
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  return {y.view(sizes), hr};
}

// Backward on the skinny kernels: dL/dhr = s·G B in one pass over G, which also sums G's columns (dL/db) and, given
// y, Σₙ Gₙᵢ yₙᵢ; dL/dA = dL/dhᵀ drop(x) and the adapter's part of dL/dx, mask ⊙ (dL/dh A), in one pass over x (G Wᵀᵀ
// then accumulated into it by BLAS); dL/dB = s·(Gᵀ hr) in one more pass over G.
std::optional<std::vector<at::Tensor>> lora_linear_backward_skinny(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, const at::Tensor& hr, double scale,
    double dropout, int64_t seed, std::array<bool, 6> output_mask, const std::optional<at::Tensor>& y) {
  const auto [need_x, need_w, need_b, need_A, need_B, need_R] = output_mask;
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_A.size(0), rp = skinny_pad(r);
  const bool need_xd = need_A || need_w;
  if (need_R || (need_xd && !has(x))) return std::nullopt;
  const at::Tensor g2 = grad.reshape({-1, out}).contiguous();                  // (N, out)
  const at::Tensor x2 = need_xd ? x->reshape({-1, in}).contiguous() : at::Tensor();  // (N, in)
  if (!skinny({x2, g2, weight, lora_A, lora_B, hr, y.value_or(at::Tensor())}, g2.size(0), in, lora_A, lora_R)) {
    return std::nullopt;
  }
  std::vector<at::Tensor> grads;
  at::Tensor gx, grad_A, sums;
  const bool want_sums = has(y) || need_b;
  if (need_x || need_A || want_sums) {
    // the column sums read G row by row here, where G's rows are in the L1 cache (in dL/dB's pass, which reads G a
    // column stripe at a time, y would cost twice a pass of its own)
    const at::Tensor Bp = pack_columns(lora_B, scale);
    at::Tensor gh;  // (N, rp), padding 0
    if (want_sums) {
      const auto y2 = has(y) ? std::optional<at::Tensor>(y->reshape({-1, out}).contiguous()) : std::nullopt;
      auto res = skinny_rows_panel_sums(g2, Bp, rp, y2);
      gh = res.out;
      sums = res.sums;
    } else {
      gh = skinny_rows_panel(g2, Bp, rp, 0.0, 0);
    }
    if (need_A) {
      auto res = skinny_columns(gh, x2, r, dropout, seed, true,
                                need_x ? std::optional<at::Tensor>(pack_rows(lora_A)) : std::nullopt);
      grad_A = res.out;
      gx = res.c;
    } else if (need_x) {  // x may be absent: the adapter's part of dL/dx, then its mask
      gx = skinny_small_rows(gh, pack_rows(lora_A), std::nullopt);  // gh's padding columns are 0
      if (dropout > 0.0) dropout_inplace_(gx, dropout, seed);
    }
  }
  at::Tensor grad_B;
  if (need_B) {
    const at::Tensor hp = r == rp ? hr.contiguous() : pack_columns(hr, 1.0);
    grad_B = skinny_columns(hp, g2, r, 0.0, 0, true, std::nullopt, /*transposed=*/true, scale).out;
  }
  if (need_x) {
    gx.addmm_(g2, weight);
    std::vector<int64_t> sizes = grad.sizes().vec();
    sizes.back() = in;
    grads.push_back(gx.view(sizes));
  }
  if (need_w) grads.push_back(at::mm(g2.t(), x2));
  if (need_b) grads.push_back(sums[1]);
  if (need_A) grads.push_back(grad_A);
  if (need_B) grads.push_back(grad_B);
  if (has(y)) grads.push_back(sums);
  return grads;
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
  if (auto fast = lora_linear_backward_skinny(grad, x, weight, lora_A, lora_B, lora_R, hr, scale, dropout, seed,
                                              output_mask, std::nullopt)) {
    return std::move(*fast);
  }
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
