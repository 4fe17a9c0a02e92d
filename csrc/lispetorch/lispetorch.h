// lispetorch core: one fused low-rank linear operator and its merge/unmerge.
//
//   y = x Wᵀ + b + s · ((drop(x) Aᵀ) Rᵀ) Bᵀ
//
// Layout conventions (row-major, as torch.nn.Linear stores them):
//   x : (..., in)      W : (out, in)     b : (out)
//   A : (r, in)        R : (r, r)        B : (out, r)
// R is optional (identity when absent). drop() is inverted dropout with a counter-based mask: the mask of
// element i of x (flattened to (N, in), row-major) is a pure function of (seed, i), so backward regenerates
// it instead of keeping a dropped copy of x.
//
// Every function here is also registered as an operator in the `lispetorch` namespace
// (torch.ops.lispetorch.*). Errors are raised with TORCH_CHECK (c10::Error), which Python sees as RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>
#include <vector>
#include <array>
#include <utility>

namespace lispetorch {

// Fused low-rank linear, differentiable (gradients for x, A, B, R and, if they require it, W and b).
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                       const std::optional<at::Tensor>& lora_R, double scale, double dropout, int64_t seed);

// Inverted dropout with the counter-based mask: x * keep(seed, i) / (1 - p).
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed);

// The boolean keep-mask used by dropout(), computed with plain ATen integer ops (any device). dropout() on
// CPU uses a fused kernel that must agree with it bit for bit.
at::Tensor dropout_mask(const at::Tensor& x, double p, int64_t seed);

// W += s·B R A, accumulated in float32 (float64 for float64 weights) and written in W's dtype, in place.
// Returns what unmerge needs to give back the pre-merge W bit for bit (see merge.cpp): int8 per-element
// distances (out, in), and the exceptions that do not fit in int8, as an index (K, 2) and pre-merge values (K).
// With safe=true a merge that would put NaN or Inf into W raises and leaves W untouched.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_merge_(at::Tensor& weight, const at::Tensor& lora_A,
                                                           const at::Tensor& lora_B,
                                                           const std::optional<at::Tensor>& lora_R, double scale,
                                                           bool safe);

// W -= s·B R A. Given what lora_merge_ returned (and W, A, B, R unchanged since), W is restored bit for bit;
// without it, it is the plain subtraction in float32.
void lora_unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const std::optional<at::Tensor>& lora_R, double scale, const std::optional<at::Tensor>& distance,
                   const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& values);

// Mixed-adapter batches, differentiable: y = x Wᵀ + b + s_g · ((drop(x) A_gᵀ) B_gᵀ) on the rows of x (viewed as
// (N, in)) whose group is g; A (G, r, in), B (G, out, r) stacked, group (N,) int64 (−1: the base alone), one scale
// per group. Each adapter's gradient comes from its own rows. See grouped.cpp.
at::Tensor lora_linear_grouped(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& group,
                               at::ArrayRef<double> scales, double dropout, int64_t seed);

// LoRA on a mixture of experts, differentiable: y = x W_eᵀ + b_e + s · ((drop(x) A_eᵀ) B_eᵀ) on the rows of x (S, in)
// routed to expert e, the rows sorted by expert and offsets (E,) the cumulative end of each expert's rows;
// W (E, out, in), b (E, out) optional, A (E, r, in), B (E, out, r) (r = 0: the experts alone). See experts.cpp.
at::Tensor lora_experts_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets,
                               double scale, double dropout, int64_t seed);

// DoRA (Liu et al. 2024), differentiable: y = g ⊙ (x Wᵀ + s · ((drop(x) Aᵀ) Rᵀ) Bᵀ) + b with g = m / n and
// n = ‖W + s·B R A‖ per output row, a constant in backward (gradients for x, A, B, R, m and, if they require it,
// W and b). magnitude m: (out). keep_output: backward reads the magnitude's gradient off the output, which is kept;
// false: nothing is kept beyond what LoRA keeps, and backward computes x Wᵀ again. See dora.cpp.
at::Tensor dora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                       const at::Tensor& magnitude, double scale, double dropout, int64_t seed,
                       bool keep_output = true);

// The row norms n = ‖W + s·B R A‖ (out) from the factors, never forming the (out, in) sum; float32 (float64 for
// float64 weights).
at::Tensor dora_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     const std::optional<at::Tensor>& lora_R, double scale);

// W ← g ⊙ (W + s·B R A), g = m / n with n the norms of the unmerged weight, in place. Returns what
// dora_unmerge_ needs to give back the pre-merge W bit for bit: lora_merge_'s distances, index and values, and n.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_merge_(
    at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
    const at::Tensor& magnitude, double scale, bool safe);

// W ← W / g − s·B R A with the merge's norms; exact given the rest of what dora_merge_ returned.
void dora_unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, const at::Tensor& norm,
                   double scale, const std::optional<at::Tensor>& distance, const std::optional<at::Tensor>& index,
                   const std::optional<at::Tensor>& values);

// s·B R A in float32 (float64 for float64 factors): the dense delta, shape (out, in).
at::Tensor lora_delta(const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                      double scale, c10::ScalarType dtype);

// The k×k Gram of the deltas sᵢBᵢAᵢ of k checkpoints of one module, G[i][j] = ⟨sᵢBᵢAᵢ, sⱼBⱼAⱼ⟩_F, computed in
// float64 from the factors only: Aᵢ (rᵢ, in), Bᵢ (out, rᵢ); ranks may differ. See gram.cpp.
at::Tensor lora_gram(at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scales);
// The same for M modules at once, in one call: entry m·k + i of each list is checkpoint i of module m (k =
// checkpoints); returns (M, k, k). Shapes may differ between modules, not between a module's checkpoints.
at::Tensor lora_gram_modules(at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scales,
                             int64_t checkpoints);

// Truncated SVD of Σᵢ sᵢBᵢAᵢ from QR factorisations of the stacked factors and an SVD of the small core,
// never forming the (out, in) sum. Returns (B (out, q), A (q, in), S (min(Σrᵢ, out, in))) in float64 with
// B A the best rank-q approximation, q = min(rank, S.size(0)), and S all singular values of the sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_factored_svd(at::TensorList lora_A, at::TensorList lora_B,
                                                                 at::ArrayRef<double> scales, int64_t rank);

// Randomised truncated SVD of weight (out, in) with `niter` subspace iterations (Halko et al. 2011): returns
// U (out, rank), S (rank,), Vh (rank, in) in float32 (float64 for float64 input). See svd_lowrank.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_lowrank(const at::Tensor& weight, int64_t rank, int64_t niter,
                                                           int64_t oversample, int64_t seed);

// Blockwise quantisation with a code table (nearest entry of x / absmax per block of `blocksize`): returns
// uint8 indices (numel,) and float32 absmax (blocks,); and its inverse, flattened, in `dtype`. See nf4.cpp.
std::tuple<at::Tensor, at::Tensor> blockwise_quantize(const at::Tensor& x, const at::Tensor& code, int64_t blocksize);
at::Tensor blockwise_dequantize(const at::Tensor& index, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, c10::ScalarType dtype);
// NF4 as bitsandbytes stores it: two 4-bit codes per byte, first element in the high nibble, float32 absmax.
std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& x, int64_t blocksize);
at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize,
                          c10::ScalarType dtype);

namespace detail {
// Checks k stacked checkpoints' factors (same in/out, matching ranks, one device, finite scales) and returns
// their ranks; every message names the list entry and its shape.
std::vector<int64_t> check_stacked_factors(at::TensorList lora_A, at::TensorList lora_B,
                                           at::ArrayRef<double> scales);
// Stacks the factors in float64: A (Σr, in) and B (out, Σr), block i of B multiplied by scales_B[i] when given.
std::pair<at::Tensor, at::Tensor> stack_factors(at::TensorList lora_A, at::TensorList lora_B,
                                                const std::vector<int64_t>& ranks, at::ArrayRef<double> scales_B);

// The factored Gram on CPU (gram_cpu.cpp): available for CPU float tensors on processors with AVX2+FMA or
// AVX-512; same result as lora_gram's ATen path, from the factors where they are (any strides).
// Modules m = 0…M−1 with k checkpoints each: factors and scales module-major (entry m·k + i), ranks[m] the ranks
// of module m's checkpoints (checked); returns (M, k, k).
bool gram_cpu_available(at::TensorList lora_A, at::TensorList lora_B);
at::Tensor lora_grams_cpu(at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scales,
                          const std::vector<std::vector<int64_t>>& ranks);

// The fused linear's skinny products on CPU in float32 (skinny_cpu.cpp), the dropout mask (p, seed) applied where
// the tall operand is read. Available where every operand (undefined ones aside) is a float32 CPU tensor, the masked
// tall operand (rows, cols) has at most 2³² elements, and the processor has AVX2+FMA or AVX-512 (simd::isa). Factors
// are packed with their rank padded to skinny_pad(r) (zero rows or columns).
bool skinny_available(at::TensorList operands, int64_t rows, int64_t cols);
int64_t skinny_pad(int64_t r);
// s · t (any strides) copied into a contiguous (rows, cols) tensor, zeros past t's rows and columns.
at::Tensor skinny_pack(const at::Tensor& t, int64_t rows, int64_t cols, double scale);
// (N, width) = drop(a) P: a (N, K), P (K, skinny_pad(r)), width ≤ P's columns (the padding's columns come out 0).
at::Tensor skinny_rows_panel(const at::Tensor& a, const at::Tensor& P, int64_t width, double p, int64_t seed);
// The same without a mask, and from the same pass over a the column sums (2, K) = (Σₙ aₙₖ yₙₖ, Σₙ aₙₖ) (the first
// row 0 without y (N, K)).
struct SkinnyPanel {
  at::Tensor out, sums;
};
SkinnyPanel skinny_rows_panel_sums(const at::Tensor& a, const at::Tensor& P, int64_t width,
                                   const std::optional<at::Tensor>& y);
// (N, d) = base + bias + a Q: a (N, r), Q (r, d), base (N, d) contiguous when given.
at::Tensor skinny_small_rows(const at::Tensor& a, const at::Tensor& Q, const std::optional<at::Tensor>& bias,
                             const at::Tensor& base = at::Tensor());
// From a (N, rp) (rp = skinny_pad(r), padding columns 0) and b (N, d), in one pass over b: out = s · aᵀ drop(b)
// (r, d), or its transpose (d, r), when want_out; c = mask ⊙ (a Q) (N, d) when Q (rp, d) is given (the mask of b's
// elements; no mask when p is 0).
struct SkinnyColumns {
  at::Tensor out, c;
};
SkinnyColumns skinny_columns(const at::Tensor& a, const at::Tensor& b, int64_t r, double p, int64_t seed,
                             bool want_out, const std::optional<at::Tensor>& Q, bool transposed = false,
                             double scale = 1.0);
// n = ‖Wᵢ + s·Cᵢ A‖ for the rows of weight (out, in): C (out, r), A (r, in) contiguous; one pass over W, the sum's
// rows never stored. Given the magnitude m (out), also DoRA's g = m / n (0 where n is 0, as dora_scale) and, with
// scaled_weight, the rows of W scaled by g (out, in), from the same reads of W.
struct SkinnyNorms {
  at::Tensor norm, g, scaled_weight;
};
SkinnyNorms skinny_row_norms(const at::Tensor& weight, const at::Tensor& C, const at::Tensor& A, double scale,
                             const at::Tensor& magnitude = at::Tensor(), bool scaled_weight = false);

// Input checks shared by every entry point; each message names the argument and the shapes it got.
void check_lora_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                       const std::optional<at::Tensor>& lora_R, double scale, double dropout);
void check_factors(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const std::optional<at::Tensor>& lora_R, double scale);

// Forward kernel: returns (y, hr) with hr = drop(x) Aᵀ Rᵀ (drop(x) Aᵀ when R is absent).
std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, double scale, double dropout, int64_t seed);

// Backward kernel: the gradients whose output_mask entry is true, in the order (x, weight, bias, A, B, R); the
// others are left out of the list. x is needed only for the gradients of weight, A and R.
std::vector<at::Tensor> lora_linear_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, const at::Tensor& hr,
    double scale, double dropout, int64_t seed, std::array<bool, 6> output_mask);

// Inference without dropout, where no gradient is wanted: y = x (W + s·B R A)ᵀ + b, with each row of the sum times
// row_scale (out) when given (DoRA's g), the sum formed a block of rows at a time and the product BLAS's own. Taken
// where it costs less than the adapter's products on the tokens (rows · (in + out) ≥ 3 · in · out) and the skinny
// kernels would run (merges_for_inference): the sum is formed in float32, as the skinny products compute.
at::Tensor merged_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                          double scale, const at::Tensor& row_scale);
bool merges_for_inference(at::TensorList operands, const at::Tensor& x, const at::Tensor& weight, double dropout);
// lora_linear's output that way, or nullopt where it does not apply (the inputs checked as lora_linear_forward does).
std::optional<at::Tensor> lora_linear_merged(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                                             double scale, double dropout);
// dora_linear's the same way: y = x (g ⊙ (W + s·B R A))ᵀ + b.
std::optional<at::Tensor> dora_linear_merged(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                                             const at::Tensor& magnitude, double scale, double dropout);

// lora_linear_backward on the skinny CPU kernels (skinny_cpu.cpp) where they take these tensors, else nullopt. Given
// y (shaped like grad), the column sums (2, out) = (Σₙ Gₙᵢ yₙᵢ, Σₙ Gₙᵢ) follow the gradients, from the same pass.
std::optional<std::vector<at::Tensor>> lora_linear_backward_skinny(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, const at::Tensor& hr, double scale,
    double dropout, int64_t seed, std::array<bool, 6> output_mask, const std::optional<at::Tensor>& y);

// The grouped kernels: forward returns (y, hr); backward the gradients whose mask entry is true, in the order
// (x, weight, bias, A, B).
std::tuple<at::Tensor, at::Tensor> lora_linear_grouped_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& group, at::ArrayRef<double> scales, double dropout, int64_t seed);
std::vector<at::Tensor> lora_linear_grouped_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& group, const at::Tensor& hr, at::ArrayRef<double> scales,
    double dropout, int64_t seed, std::array<bool, 5> output_mask);

// The experts kernels: forward returns (y, hr); backward the gradients whose mask entry is true, in the order
// (x, weight, bias, A, B).
std::tuple<at::Tensor, at::Tensor> lora_experts_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& offsets, double scale, double dropout, int64_t seed);
std::vector<at::Tensor> lora_experts_linear_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& offsets, const at::Tensor& hr, double scale, double dropout,
    int64_t seed, std::array<bool, 5> output_mask);

// The dtype merges and DoRA's norms accumulate in: float64 for float64, float32 otherwise.
c10::ScalarType accumulate_type(c10::ScalarType t);
// DoRA's row factor g = m / n in n's dtype, 0 where n is 0: the one formula the operator, merge and unmerge use.
at::Tensor dora_scale(const at::Tensor& magnitude, const at::Tensor& norm);

// A magnitude vector that fits weight: (out,), floating point, on its device.
void check_magnitude(const at::Tensor& weight, const at::Tensor& magnitude);

// DoRA's kernels: forward returns (y, hr, n) (n the row norms, see dora_norm); backward the gradients whose
// output_mask entry is true, in the order (x, weight, bias, A, B, R, magnitude). y is the forward's output, or
// absent: then z = x Wᵀ + s·hr Bᵀ is computed again for the magnitude's gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, double scale,
    double dropout, int64_t seed);
std::vector<at::Tensor> dora_linear_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, const std::optional<at::Tensor>& y,
    const at::Tensor& hr, const at::Tensor& norm, double scale, double dropout, int64_t seed,
    std::array<bool, 7> output_mask);

// In-place dropout on a contiguous tensor whose flattened index is the mask's counter.
void dropout_inplace_(at::Tensor& t, double p, int64_t seed);
// The same mask drawn once for two tensors shaped alike: returns drop(x) and applies it to g in place.
at::Tensor dropout_pair_(const at::Tensor& x, at::Tensor& g, double p, int64_t seed);
}  // namespace detail

}  // namespace lispetorch
