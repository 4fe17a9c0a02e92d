// DoRA (Liu et al. 2024) in the fused operator: the weight-decomposed update
//
//   W' = m ⊙ (W + s·B R A) / n,   n = ‖W + s·B R A‖ per output row (a constant in backward, as the paper proposes),
//   y  = g ⊙ (x Wᵀ + s · hr Bᵀ) + b,   g = m / n (out),   hr = drop(x) Aᵀ Rᵀ (N, r)
//
// The row norms never form the (out, in) sum. On the CPU in float32 each row of W + s·C A (C = B R) is formed a
// vector at a time in registers and its squares summed, in one pass over W (skinny_cpu.cpp). Elsewhere, with
// P = W Aᵀ (out, r) and the Gram Q = A Aᵀ (r, r),
//   n² = ‖wᵢ‖² + 2s Cᵢ·Pᵢ + s² Cᵢ Q Cᵢᵀ,
// one (out, in)×(in, r) product and a pass over W. A row whose norm is 0 (a zero row of W + s·B R A) has g = 0.
//
// Backward needs dL/dm = Σₙ Gₙᵢ zₙᵢ / nᵢ with z = x Wᵀ + s·hr Bᵀ. By default it reads z off the output,
// z = (y − b) / g, so the output is kept (which the next layer often keeps too), not a copy of z:
// dL/dm = Σₙ Gₙᵢ (yₙᵢ − bᵢ) / mᵢ; the rows where m is 0 (there y − b is 0 and z is lost) recompute their columns of
// z. Without the output (keep_output false: what is kept is LoRA's), backward computes z again, a product as large
// as the base layer's own. g is a constant to the other gradients, so folding it into the rows of W and B (or, for
// batches of fewer rows than W has columns, into the rows of the output and the columns of its gradient) makes
// them LoRA's, computed by LoRA's kernels. Dropout applies to the low-rank branch's input, as in LoRA, and costs no
// memory.
#include "lispetorch.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace lispetorch {

namespace {
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// On the CPU in float32: the norms from one pass over W (skinny_row_norms), with g and g⊙W when given the
// magnitude; nullopt where the kernels do not take these tensors.
std::optional<detail::SkinnyNorms> skinny_norms(const at::Tensor& weight, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                                                double scale, const at::Tensor& magnitude = at::Tensor(),
                                                bool scaled_weight = false) {
  if (!detail::skinny_available({weight, lora_A, lora_B, lora_R.value_or(at::Tensor()), magnitude}, weight.size(0),
                                weight.size(1))) {
    return std::nullopt;
  }
  const at::Tensor C = has(lora_R) ? at::mm(lora_B, *lora_R) : lora_B;
  return detail::skinny_row_norms(weight.contiguous(), C, lora_A.contiguous(), scale, magnitude, scaled_weight);
}
}  // namespace

namespace detail {
at::Tensor dora_scale(const at::Tensor& magnitude, const at::Tensor& norm) {
  const at::Tensor m = magnitude.to(norm.scalar_type());
  if (norm.device().is_cpu() && norm.scalar_type() == at::kFloat && norm.dim() == 1 && m.sizes() == norm.sizes()) {
    // a loop over the rows (the same IEEE quotients): the ATen form below is five calls on a short vector
    const at::Tensor n = norm.contiguous(), mc = m.contiguous();
    at::Tensor g = at::empty_like(n);
    const float* np = n.const_data_ptr<float>();
    const float* mp = mc.const_data_ptr<float>();
    float* gp = g.mutable_data_ptr<float>();
    for (int64_t i = 0; i < n.numel(); ++i) gp[i] = np[i] > 0.0f ? mp[i] / np[i] : 0.0f;
    return g;
  }
  return at::where(norm.gt(0), m / norm, at::zeros_like(norm));
}

void check_magnitude(const at::Tensor& weight, const at::Tensor& magnitude) {
  TORCH_CHECK(magnitude.defined(), "magnitude is undefined");
  TORCH_CHECK(at::isFloatingType(magnitude.scalar_type()), "magnitude must be a floating-point tensor, got ",
              magnitude.scalar_type());
  TORCH_CHECK(magnitude.dim() == 1 && magnitude.size(0) == weight.size(0), "magnitude must be (out,) = (",
              weight.size(0), ",) for weight ", weight.sizes(), ", got shape ", magnitude.sizes());
  TORCH_CHECK(magnitude.device() == weight.device(), "weight is on ", weight.device(), " but magnitude is on ",
              magnitude.device());
}
}  // namespace detail

at::Tensor dora_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     const std::optional<at::Tensor>& lora_R, double scale) {
  detail::check_factors(weight, lora_A, lora_B, lora_R, scale);
  const c10::ScalarType acc = detail::accumulate_type(weight.scalar_type());
  if (auto res = skinny_norms(weight, lora_A, lora_B, lora_R, scale)) return res->norm;
  const at::Tensor A = lora_A.to(acc);                                            // (r, in)
  at::Tensor C = lora_B.to(acc);                                                  // (out, r)
  if (has(lora_R)) C = at::mm(C, lora_R->to(acc));                                // B R
  const at::Tensor Q = at::mm(A, A.t());                                          // (r, r)
  const at::Tensor P = at::mm(weight, lora_A.to(weight.scalar_type()).t()).to(acc);  // W Aᵀ (out, r)
  const std::vector<int64_t> rows{1};
  at::Tensor w2 = at::linalg_vector_norm(weight, 2, rows, false, acc);           // ‖wᵢ‖ (out)
  w2.mul_(w2);
  w2.add_(at::sum(C * P, 1), 2.0 * scale);
  w2.add_(at::sum(at::mm(C, Q).mul_(C), 1), scale * scale);
  return w2.clamp_min_(0).sqrt_();                                                // (out)
}

namespace {
// float32 rows [r0, r1) of G and Y (row length out) summed into dot and sum (float accumulators), compiled for
// each vector unit (simd.h).
LT_INLINE void column_dots_f32_body(const float* gp, const float* yp, int64_t r0, int64_t r1, int64_t out,
                                    float* dot, float* sum) {
  for (int64_t row = r0; row < r1; ++row) {
    const float* gr = gp + row * out;
    const float* yr = yp + row * out;
    for (int64_t i = 0; i < out; ++i) {
      dot[i] += gr[i] * yr[i];
      sum[i] += gr[i];
    }
  }
}
LT_VECTOR_KERNEL(column_dots_f32, (const float* gp, const float* yp, int64_t r0, int64_t r1, int64_t out,
                                   float* dot, float* sum),
                 (gp, yp, r0, r1, out, dot, sum))

// Column sums Σₙ Gₙᵢ yₙᵢ and Σₙ Gₙᵢ of two (N, out) tensors in one pass, in the accumulation dtype. On CPU a loop
// over row blocks with a partial sum per block (float32: the vectorised kernel above); elsewhere ATen.
std::pair<at::Tensor, at::Tensor> column_dots(const at::Tensor& g2, const at::Tensor& y2, c10::ScalarType acc) {
  if (!g2.device().is_cpu() || g2.scalar_type() != y2.scalar_type()) {
    return {at::sum(g2 * y2, 0, false, acc), at::sum(g2, 0, false, acc)};
  }
  const at::Tensor G = g2.contiguous(), Y = y2.contiguous();
  const int64_t n = G.size(0), out = G.size(1);
  constexpr int64_t kRows = 64;
  const int64_t blocks = std::max<int64_t>(1, (n + kRows - 1) / kRows);
  at::Tensor partial = at::zeros({blocks, 2, out}, G.options().dtype(acc));
  if (G.scalar_type() == at::kFloat) {
    const auto kernel = column_dots_f32_kernel();
    const float* gp = G.const_data_ptr<float>();
    const float* yp = Y.const_data_ptr<float>();
    float* pp = partial.mutable_data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        kernel(gp, yp, b * kRows, std::min(n, (b + 1) * kRows), out, pp + b * 2 * out, pp + b * 2 * out + out);
      }
    });
    const at::Tensor total = partial.sum(0);  // (2, out)
    return {total.select(0, 0), total.select(0, 1)};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.scalar_type(), "lispetorch_dora_column_dots", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(c10::CppTypeToScalarType<acc_t>::value == acc, "accumulation dtype mismatch");
    const scalar_t* gp = G.const_data_ptr<scalar_t>();
    const scalar_t* yp = Y.const_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* dot = pp + b * 2 * out;
        acc_t* sum = dot + out;
        for (int64_t row = b * kRows; row < std::min(n, (b + 1) * kRows); ++row) {
          const scalar_t* gr = gp + row * out;
          const scalar_t* yr = yp + row * out;
          for (int64_t i = 0; i < out; ++i) {
            const acc_t gv = static_cast<acc_t>(gr[i]);
            dot[i] += gv * static_cast<acc_t>(yr[i]);
            sum[i] += gv;
          }
        }
      }
    });
  });
  const at::Tensor total = partial.sum(0);  // (2, out)
  return {total.select(0, 0), total.select(0, 1)};
}

// The rows of t (out, k) scaled by g (out).
at::Tensor scale_rows(const at::Tensor& t, const at::Tensor& g) { return t * g.to(t.scalar_type()).unsqueeze(1); }

// g folds into the weight's rows (out × in values) or into the rows of the output and its gradient (N × out),
// whichever is the fewer: the weight for training batches, the rows for decoding (N = 1), where scaling W would cost
// a pass over it as long as the frozen product itself.
bool scales_weight(int64_t rows, int64_t in) { return rows >= in; }

// Rows of the (…, in) tensor t, 0 for an empty last dimension.
int64_t rows_of(const at::Tensor& t, int64_t in) { return in > 0 ? t.numel() / in : 0; }

// dL/dm = Σₙ Gₙᵢ zₙᵢ / nᵢ from dot = Σₙ Gₙᵢ yₙᵢ and sum = Σₙ Gₙᵢ: (dot − bᵢ·sum) / mᵢ, 0 where m is 0, and whether
// m has such rows (the caller recomputes them). On CPU in float32 one loop, else ATen.
std::pair<at::Tensor, bool> magnitude_grad(const at::Tensor& dot, const at::Tensor& sum,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& m) {
  if (dot.device().is_cpu() && dot.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat) {
    const at::Tensor d = dot.contiguous(), s = sum.contiguous(), mc = m.contiguous();
    const at::Tensor b = has(bias) ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor out = at::empty_like(d);
    const float *dp = d.const_data_ptr<float>(), *sp = s.const_data_ptr<float>(), *mp = mc.const_data_ptr<float>();
    const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
    float* op = out.mutable_data_ptr<float>();
    bool any_zero = false;
    for (int64_t i = 0; i < d.numel(); ++i) {
      const float t = bp ? dp[i] - sp[i] * bp[i] : dp[i];
      any_zero = any_zero || mp[i] == 0.0f;
      op[i] = mp[i] != 0.0f ? t / mp[i] : 0.0f;
    }
    return {out, any_zero};
  }
  at::Tensor t = dot;
  if (has(bias)) t = t - sum * bias->to(dot.scalar_type());
  const at::Tensor zero = m.eq(0);
  return {at::where(zero, at::zeros_like(m), t / at::where(zero, at::ones_like(m), m)), zero.any().item<bool>()};
}
}  // namespace

namespace detail {

// With g folded into the rows of W and B, DoRA's forward is LoRA's: y = x (g⊙W)ᵀ + s·hr (g⊙B)ᵀ + b; on the CPU in
// float32 g⊙W comes out of the pass over W that gives the norms. For fewer rows than W has columns, LoRA's forward
// on W and B with its output's rows scaled by g instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, double scale,
    double dropout, int64_t seed) {
  check_lora_inputs(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout);
  check_magnitude(weight, magnitude);
  const bool weight_side = scales_weight(rows_of(x, weight.size(1)), weight.size(1));
  at::Tensor norm, g, Wg;                                                         // (out), accumulation dtype
  if (auto res = skinny_norms(weight, lora_A, lora_B, lora_R, scale, magnitude, weight_side)) {
    norm = res->norm;
    g = res->g;
    Wg = res->scaled_weight;
  } else {
    norm = dora_norm(weight, lora_A, lora_B, lora_R, scale);
    g = dora_scale(magnitude, norm);
    if (weight_side) Wg = scale_rows(weight, g);
  }
  if (weight_side) {
    auto [y, hr] = lora_linear_forward(x, Wg, bias, lora_A, scale_rows(lora_B, g), lora_R, scale, dropout, seed);
    return {y, hr, norm};
  }
  auto [y, hr] = lora_linear_forward(x, weight, std::nullopt, lora_A, lora_B, lora_R, scale, dropout, seed);
  y.mul_(g.to(y.scalar_type()));
  if (has(bias)) y.add_(*bias);
  return {y, hr, norm};
}

std::optional<at::Tensor> dora_linear_merged(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                                             const at::Tensor& magnitude, double scale, double dropout) {
  check_lora_inputs(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout);
  check_magnitude(weight, magnitude);
  if (!merges_for_inference({x, weight, lora_A, lora_B, lora_R.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                             magnitude}, x, weight, dropout)) {
    return std::nullopt;
  }
  const auto norms = skinny_norms(weight, lora_A, lora_B, lora_R, scale, magnitude, false);
  const at::Tensor g = norms ? norms->g : dora_scale(magnitude, dora_norm(weight, lora_A, lora_B, lora_R, scale));
  return merged_product(x, weight, bias, lora_A, lora_B, lora_R, scale, g);
}

// Backward: LoRA's with g⊙W and g⊙B, whose gradients of x, A and R are DoRA's; those of W and B are DoRA's once
// their rows are scaled by g. For fewer rows than W has columns, LoRA's with W, B and G's columns scaled by g
// instead, whose gradients are all DoRA's. dL/dm from the output gradient and the output (the pass over G that
// gives dL/dh, on the skinny kernels).
std::vector<at::Tensor> dora_linear_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, const std::optional<at::Tensor>& y,
    const at::Tensor& hr, const at::Tensor& norm, double scale, double dropout, int64_t seed,
    std::array<bool, 7> output_mask) {
  const auto [need_x, need_w, need_b, need_A, need_B, need_R, need_m] = output_mask;
  check_factors(weight, lora_A, lora_B, lora_R, scale);
  check_magnitude(weight, magnitude);
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(grad.size(-1) == out, "grad_output has ", grad.size(-1), " features (shape ", grad.sizes(),
              ") but weight has ", out, " outputs");
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == out, "saved norm has shape ", norm.sizes(), " but weight has ", out,
              " outputs");
  const c10::ScalarType acc = norm.scalar_type();
  const at::Tensor g = dora_scale(magnitude, norm);                               // (out), accumulation dtype
  const at::Tensor g2 = grad.reshape({-1, out});                                  // (N, out)
  const bool need_sums = need_m || need_b, weight_side = scales_weight(g2.size(0), in), have_y = has(y);
  TORCH_CHECK(have_y || !need_m || has(x), "the gradient of the magnitude needs the layer's output or its input; "
              "neither was given");
  at::Tensor col_dot, col_sum;
  std::vector<at::Tensor> grads;
  const std::array<bool, 6> inner_mask{need_x, need_w, false, need_A, need_B, need_R};
  const bool need_inner = need_x || need_w || need_A || need_B || need_R;
  // the inner (LoRA) backward's operands: g folded into W and B, or into G's columns
  const at::Tensor G = weight_side || !need_inner ? grad : grad * g.to(grad.scalar_type());
  const at::Tensor Wi = weight_side && need_x ? scale_rows(weight, g) : weight;   // only dL/dx reads it
  const at::Tensor Bi = weight_side ? scale_rows(lora_B, g) : lora_B;
  // On the skinny CPU kernels the column sums come from the pass over G that gives dL/dh.
  const bool sums_inside = need_sums && weight_side && have_y;
  auto fast = acc == at::kFloat && need_inner
                  ? lora_linear_backward_skinny(G, x, Wi, lora_A, Bi, lora_R, hr, scale, dropout, seed, inner_mask,
                                                sums_inside ? y : std::nullopt)
                  : std::nullopt;
  if (fast && sums_inside) {
    const at::Tensor sums = fast->back();
    fast->pop_back();
    col_dot = sums[0];
    col_sum = sums[1];
  } else if (need_sums && have_y) {
    std::tie(col_dot, col_sum) = column_dots(g2, y->reshape({-1, out}), acc);
  } else if (need_m) {  // without the output: z = x Wᵀ + s·hr Bᵀ again, a product as large as the base layer's
    at::Tensor z = at::mm(x->reshape({-1, in}), weight.t());                    // (N, out)
    z.addmm_(hr, lora_B.t(), 1.0, scale);
    std::tie(col_dot, col_sum) = column_dots(g2, z, acc);                       // Σₙ Gₙᵢ zₙᵢ, Σₙ Gₙᵢ
  } else if (need_b) {
    col_sum = at::sum(g2, 0, false, acc);
  }
  if (need_inner) {
    const auto inner = fast ? std::move(*fast)
                            : lora_linear_backward(G, x, Wi, lora_A, Bi, lora_R, hr, scale, dropout, seed,
                                                   inner_mask);
    size_t k = 0;
    if (need_x) grads.push_back(inner.at(k++));
    if (need_w) grads.push_back(weight_side ? scale_rows(inner.at(k++), g) : inner.at(k++));
    if (need_b) grads.push_back(col_sum.to(grad.scalar_type()));
    if (need_A) grads.push_back(inner.at(k++));
    if (need_B) grads.push_back(weight_side ? scale_rows(inner.at(k++), g) : inner.at(k++));
    if (need_R) grads.push_back(inner.at(k++));
  } else if (need_b) {
    grads.push_back(col_sum.to(grad.scalar_type()));
  }
  if (need_m && !have_y) {
    grads.push_back(dora_scale(col_dot, norm).to(magnitude.scalar_type()));     // Σₙ Gₙᵢ zₙᵢ / nᵢ, 0 where n is 0
  } else if (need_m) {
    const at::Tensor m = magnitude.to(acc);
    auto [grad_m, any_zero] = magnitude_grad(col_dot, col_sum, bias, m);        // Σₙ Gₙᵢ (yₙᵢ − bᵢ) / mᵢ
    if (any_zero) {
      const at::Tensor zero = m.eq(0);
      // Rows with m = 0: y − b is 0 there, so their columns of z are computed again (x Wᵢᵀ + s·hr Bᵢᵀ).
      TORCH_CHECK(has(x), "the layer input is needed for the gradient of a zero magnitude but was not given");
      const at::Tensor rows = zero.nonzero().flatten();
      const at::Tensor x2 = x->reshape({-1, in});
      at::Tensor z = at::mm(x2, weight.index_select(0, rows).t());                // (N, k)
      z.addmm_(hr, lora_B.index_select(0, rows).t(), 1.0, scale);
      const at::Tensor nk = norm.index_select(0, rows);
      const at::Tensor tk = at::sum(g2.index_select(1, rows).to(acc) * z.to(acc), 0);
      grad_m.index_put_({rows}, at::where(nk.gt(0), tk / at::where(nk.gt(0), nk, at::ones_like(nk)),
                                          at::zeros_like(nk)));
    }
    grads.push_back(grad_m.to(magnitude.scalar_type()));
  }
  return grads;
}

}  // namespace detail

}  // namespace lispetorch

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("dora_norm", &lispetorch::dora_norm);
  m.impl("dora_linear_forward", &lispetorch::detail::dora_linear_forward);
  m.impl("dora_linear_backward", &lispetorch::detail::dora_linear_backward);
}
