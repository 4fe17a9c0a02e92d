// Merge and unmerge: W ± s·B R A (and DoRA's m ⊙ (W + s·B R A) / n and back), accumulated in float32 (float64 for float64 weights), written in place.
//
// Exact unmerge. Rounding makes round(round(W + Δ) - Δ) differ from W by a few units in the last place. At
// merge we compute that round trip once and keep, per element, the signed distance between W and it, counted
// in representable values (the float's bit pattern mapped to a monotonic integer), as int8. The rare elements
// whose distance does not fit (weights much smaller than the delta added to them) are kept as exceptions:
// their (row, column) and pre-merge value. Memory: 1 byte per weight element, plus 16 bytes and one value per
// exception. Unmerge repeats the same round trip, adds the distances back and restores the exceptions, which is
// exact as long as W, A, B and R are unchanged since the merge (the Python layer checks their version counters
// and otherwise falls back to the plain subtraction).
#include "lispetorch.h"

#include <ATen/ATen.h>
#include <ATen/TensorIndexing.h>

#include <limits>

namespace lispetorch {
namespace {

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }


c10::ScalarType bits_type(c10::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
    case at::kHalf:
      return at::kShort;
    case at::kFloat:
      return at::kInt;
    case at::kDouble:
      return at::kLong;
    default:
      TORCH_CHECK(false, "weight must be float16, bfloat16, float32 or float64, got ", t);
  }
}

c10::Scalar min_of(c10::ScalarType t) {
  switch (t) {
    case at::kShort:
      return std::numeric_limits<int16_t>::min();
    case at::kInt:
      return std::numeric_limits<int32_t>::min();
    default:
      return std::numeric_limits<int64_t>::min();
  }
}

// Maps a float's bit pattern (as a signed integer) to an integer that is monotonic in the float's value, with
// consecutive representable values one apart (-0 ↦ -1, +0 ↦ 0). The map is its own inverse.
at::Tensor ordered(const at::Tensor& bits) {
  return at::where(bits.lt(0), at::bitwise_not(bits).add_(min_of(bits.scalar_type())), bits);
}

}  // namespace

namespace detail {
c10::ScalarType accumulate_type(c10::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
}  // namespace detail

at::Tensor lora_delta(const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                      double scale, c10::ScalarType dtype) {
  const at::Tensor A = lora_A.to(dtype), B = lora_B.to(dtype);                  // (r, in), (out, r)
  const at::Tensor RA = has(lora_R) ? at::mm(lora_R->to(dtype), A) : A;         // (r, in)
  return at::mm(B, RA).mul_(scale);                                              // (out, in)
}

namespace {
// What unmerge needs to turn round_trip (the pre-merge W as unmerge will compute it) back into weight bit for bit:
// per-element distances as int8, and the elements whose distance does not fit (or whose round trip is not
// finite) as an index (K, 2) and their values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> exact_state(const at::Tensor& weight, const at::Tensor& round_trip) {
  const c10::ScalarType bt = bits_type(weight.scalar_type());
  const c10::ScalarType wide = bt == at::kLong ? at::kLong : at::kInt;
  at::Tensor distance = at::sub(ordered(weight.view(bt)).to(wide), ordered(round_trip.view(bt)).to(wide));
  const at::Tensor outside = distance.abs().gt(127).logical_or_(at::logical_not(at::isfinite(round_trip)));
  const at::Tensor index = outside.nonzero();                                   // (K, 2) row, column
  const at::Tensor values = weight.index({outside});                            // (K,) pre-merge values
  distance.masked_fill_(outside, 0);
  return {distance.to(at::kChar), index, values};
}

// weight = round_trip corrected by exact_state's distances and exceptions; the plain round trip without them.
void restore(at::Tensor& weight, const at::Tensor& round_trip, const std::optional<at::Tensor>& distance,
             const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& values) {
  if (!has(distance)) {
    weight.copy_(round_trip);
    return;
  }
  const c10::ScalarType wt = weight.scalar_type(), bt = bits_type(wt);
  const at::Tensor& d = *distance;
  TORCH_CHECK(d.sizes() == weight.sizes() && d.scalar_type() == at::kChar, "merge distances must be int8 of the "
              "weight's shape ", weight.sizes(), ", got ", d.scalar_type(), " ", d.sizes());
  TORCH_CHECK(has(index) && has(values), "merge distances given without the exception index and values");
  TORCH_CHECK(index->dim() == 2 && index->size(1) == 2 && values->dim() == 1 && values->size(0) == index->size(0),
              "merge exceptions must be an index (K, 2) and values (K,), got ", index->sizes(), " and ",
              values->sizes());
  const c10::ScalarType wide = bt == at::kLong ? at::kLong : at::kInt;
  const at::Tensor restored = ordered(at::add(ordered(round_trip.view(bt)).to(wide), d.to(wide)).to(bt));
  weight.copy_(restored.view(wt));
  if (index->size(0) > 0) {
    weight.index_put_({index->select(1, 0), index->select(1, 1)}, values->to(wt));
  }
}

void refuse_non_finite(const at::Tensor& merged, const at::Tensor& weight) {
  const int64_t bad = at::logical_not(at::isfinite(merged)).sum().item<int64_t>();
  TORCH_CHECK(bad == 0, "merge refused: it would put NaN or Inf into ", bad, " of the ", merged.numel(),
              " elements of the weight (shape ", weight.sizes(), "); the weight was left unchanged");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_merge_(at::Tensor& weight, const at::Tensor& lora_A,
                                                           const at::Tensor& lora_B,
                                                           const std::optional<at::Tensor>& lora_R, double scale,
                                                           bool safe) {
  detail::check_factors(weight, lora_A, lora_B, lora_R, scale);
  const c10::ScalarType wt = weight.scalar_type(), acc = detail::accumulate_type(wt);
  const at::Tensor delta = lora_delta(lora_A, lora_B, lora_R, scale, acc);     // (out, in)
  const at::Tensor merged = at::add(weight.to(acc), delta).to(wt);
  if (safe) refuse_non_finite(merged, weight);
  const at::Tensor round_trip = at::sub(merged.to(acc), delta).to(wt);
  auto state = exact_state(weight, round_trip);
  weight.copy_(merged);
  return state;
}

void lora_unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const std::optional<at::Tensor>& lora_R, double scale, const std::optional<at::Tensor>& distance,
                   const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& values) {
  detail::check_factors(weight, lora_A, lora_B, lora_R, scale);
  const c10::ScalarType wt = weight.scalar_type(), acc = detail::accumulate_type(wt);
  const at::Tensor delta = lora_delta(lora_A, lora_B, lora_R, scale, acc);
  restore(weight, at::sub(weight.to(acc), delta).to(wt), distance, index, values);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_merge_(
    at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
    const at::Tensor& magnitude, double scale, bool safe) {
  detail::check_factors(weight, lora_A, lora_B, lora_R, scale);
  detail::check_magnitude(weight, magnitude);
  const c10::ScalarType wt = weight.scalar_type(), acc = detail::accumulate_type(wt);
  const at::Tensor delta = lora_delta(lora_A, lora_B, lora_R, scale, acc);     // (out, in)
  const at::Tensor norm = dora_norm(weight, lora_A, lora_B, lora_R, scale);     // of the unmerged weight (out)
  const at::Tensor g = detail::dora_scale(magnitude, norm).unsqueeze(1);       // (out, 1)
  const at::Tensor merged = at::add(weight.to(acc), delta).mul_(g).to(wt);       // g ⊙ (W + Δ)
  if (safe) refuse_non_finite(merged, weight);
  const at::Tensor round_trip = at::div(merged.to(acc), g).sub_(delta).to(wt);
  auto [distance, index, values] = exact_state(weight, round_trip);
  weight.copy_(merged);
  return {distance, index, values, norm};
}

void dora_unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, const at::Tensor& norm,
                   double scale, const std::optional<at::Tensor>& distance, const std::optional<at::Tensor>& index,
                   const std::optional<at::Tensor>& values) {
  detail::check_factors(weight, lora_A, lora_B, lora_R, scale);
  detail::check_magnitude(weight, magnitude);
  const c10::ScalarType wt = weight.scalar_type(), acc = detail::accumulate_type(wt);
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == weight.size(0) && norm.scalar_type() == acc, "the merge's norm "
              "must be (out,) = (", weight.size(0), ",) in ", acc, ", got ", norm.scalar_type(), " ", norm.sizes());
  const at::Tensor delta = lora_delta(lora_A, lora_B, lora_R, scale, acc);
  const at::Tensor g = detail::dora_scale(magnitude, norm).unsqueeze(1);
  at::Tensor round_trip = at::div(weight.to(acc), g).sub_(delta);
  if (!has(distance)) {  // rows merged with g = 0 hold nothing to divide: they come back as the plain difference
    round_trip = at::where(g.eq(0), at::sub(weight.to(acc), delta), round_trip);
  }
  restore(weight, round_trip.to(wt), distance, index, values);
}

}  // namespace lispetorch

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_delta", &lispetorch::lora_delta);
  m.impl("lora_merge_", &lispetorch::lora_merge_);
  m.impl("lora_unmerge_", &lispetorch::lora_unmerge_);
  m.impl("dora_merge_", &lispetorch::dora_merge_);
  m.impl("dora_unmerge_", &lispetorch::dora_unmerge_);
}
