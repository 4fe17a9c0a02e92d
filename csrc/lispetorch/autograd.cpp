// Autograd for lora_linear and dora_linear, in C++: forward and backward go through the dispatcher to the
// lora_linear_forward / lora_linear_backward operators (so fake tensors and torch.compile see registered ops),
// and only what backward needs is saved: the layer input (only when a gradient needs it: A, R or W), the
// factors, and hr = drop(x) Aᵀ Rᵀ of shape (N, r). No dropped copy of x and no mask is kept: backward
// regenerates the mask from the seed.
#include "lispetorch.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>

namespace lispetorch {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&, double, double, int64_t)>();
  return op;
}

const auto& backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_linear_backward", "")
                       .typed<std::vector<at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double, double,
                           int64_t, std::array<bool, 6>)>();
  return op;
}

inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

template <size_t N>
bool any_wanted(const std::array<bool, N>& mask) {
  return std::any_of(mask.begin(), mask.end(), [](bool wanted) { return wanted; });
}

// A kernel's gradients (the wanted ones, in order) put at their inputs' places among `slots` (one per argument of
// forward, undefined where there is no gradient).
template <size_t N>
variable_list place(const std::array<bool, N>& mask, const std::vector<at::Tensor>& grads, size_t slots) {
  variable_list out(slots);
  size_t k = 0;
  for (size_t i = 0; i < N; ++i) {
    if (mask[i]) out[i] = grads.at(k++);
  }
  return out;
}

// Inputs, in order: x, weight, bias, A, B, R (bias and R optional), then scale, dropout, seed. backward returns
// one entry per argument, undefined where there is no gradient.
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R, double scale,
                            double dropout, int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, hr] = forward_op().call(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout, seed);
    const at::Tensor R = lora_R.value_or(at::Tensor());
    const bool keep_x = lora_A.requires_grad() || weight.requires_grad() || (R.defined() && R.requires_grad());
    ctx->save_for_backward({keep_x ? x : at::Tensor(), weight, lora_A, lora_B, R, hr});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &lora_R = saved[4],
                     &hr = saved[5];
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), has_R = lora_R.defined();
    // needs_input_grad counts only the tensor inputs that were given: x, weight, [bias], A, B, [R].
    const size_t b = has_bias ? 1 : 0;
    std::array<bool, 6> mask = {ctx->needs_input_grad(0),         ctx->needs_input_grad(1),
                                has_bias && ctx->needs_input_grad(2), ctx->needs_input_grad(2 + b),
                                ctx->needs_input_grad(3 + b),     has_R && ctx->needs_input_grad(4 + b)};
    const at::Tensor& grad = grad_outputs[0];
    if (!any_wanted(mask) || !grad.defined()) return variable_list(9);
    const auto grads = backward_op().call(grad, opt(x), weight, lora_A, lora_B, opt(lora_R), hr,
                                          ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout"].toDouble(),
                                          ctx->saved_data["seed"].toInt(), mask);
    return place(mask, grads, 9);
  }
};

// Whether autograd will want a gradient of any of these (grad mode on and one requires it).
bool any_grad(std::initializer_list<std::reference_wrapper<const at::Tensor>> inputs) {
  return at::GradMode::is_enabled() &&
         std::any_of(inputs.begin(), inputs.end(), [](const at::Tensor& t) { return t.defined() && t.requires_grad(); });
}

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                const std::optional<at::Tensor>& lora_R, double scale, double dropout,
                                int64_t seed) {
  const at::Tensor b = bias.value_or(at::Tensor()), R = lora_R.value_or(at::Tensor());
  if (!any_grad({x, weight, b, lora_A, lora_B, R})) {  // nothing to save: the op below autograd (lora_linear_no_grad)
    at::AutoDispatchBelowADInplaceOrView guard;
    return lispetorch::lora_linear(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout, seed);
  }
  return LoraLinearFunction::apply(x, weight, opt(bias.value_or(at::Tensor())), lora_A, lora_B,
                                   opt(lora_R.value_or(at::Tensor())), scale, dropout, seed);
}

at::Tensor lora_linear_no_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                               const std::optional<at::Tensor>& lora_R, double scale, double dropout,
                               int64_t seed) {
  if (auto y = detail::lora_linear_merged(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout)) return *y;
  return std::get<0>(forward_op().call(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout, seed));
}

const auto& dora_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::dora_linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double, double,
                           int64_t)>();
  return op;
}

const auto& dora_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::dora_linear_backward", "")
                       .typed<std::vector<at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, double, double, int64_t, std::array<bool, 7>)>();
  return op;
}

// DoRA: inputs x, weight, bias, A, B, R (bias and R optional), magnitude, then scale, dropout, seed, keep_output.
// Saved: what LoRA saves, the magnitude, the row norms (out) and, with keep_output, the output itself (dL/dm reads z
// off it; see dora.cpp), which is the tensor the next layer receives, not a copy; without, backward computes z
// again from x.
class DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                            const at::Tensor& magnitude, double scale, double dropout, int64_t seed,
                            bool keep_output) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, hr, norm] = dora_forward_op().call(x, weight, bias, lora_A, lora_B, lora_R, magnitude, scale, dropout,
                                                seed);
    const at::Tensor R = lora_R.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    const bool keep_x = lora_A.requires_grad() || weight.requires_grad() || magnitude.requires_grad() ||
                        (R.defined() && R.requires_grad());
    // the output only where dL/dm will read it (dL/db is G's column sums)
    const bool keep_y = keep_output && magnitude.requires_grad();
    ctx->save_for_backward({keep_x ? x : at::Tensor(), weight, b, lora_A, lora_B, R, magnitude,
                            keep_y ? y : at::Tensor(), hr, norm});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &lora_A = saved[3], &lora_B = saved[4],
                     &lora_R = saved[5], &magnitude = saved[6], &y = saved[7], &hr = saved[8], &norm = saved[9];
    const bool has_bias = bias.defined(), has_R = lora_R.defined();
    // needs_input_grad counts only the tensor inputs that were given: x, weight, [bias], A, B, [R], magnitude.
    const size_t b = has_bias ? 1 : 0, r = has_R ? 1 : 0;
    std::array<bool, 7> mask = {ctx->needs_input_grad(0),
                                ctx->needs_input_grad(1),
                                has_bias && ctx->needs_input_grad(2),
                                ctx->needs_input_grad(2 + b),
                                ctx->needs_input_grad(3 + b),
                                has_R && ctx->needs_input_grad(4 + b),
                                ctx->needs_input_grad(4 + b + r)};
    const at::Tensor& grad = grad_outputs[0];
    if (!any_wanted(mask) || !grad.defined()) return variable_list(11);
    const auto grads = dora_backward_op().call(grad, opt(x), weight, opt(bias), lora_A, lora_B, opt(lora_R),
                                               magnitude, opt(y), hr, norm, ctx->saved_data["scale"].toDouble(),
                                               ctx->saved_data["dropout"].toDouble(), ctx->saved_data["seed"].toInt(),
                                               mask);
    return place(mask, grads, 11);
  }
};

at::Tensor dora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, double scale,
                                double dropout, int64_t seed, bool keep_output) {
  const at::Tensor b = bias.value_or(at::Tensor()), R = lora_R.value_or(at::Tensor());
  if (!any_grad({x, weight, b, lora_A, lora_B, R, magnitude})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lispetorch::dora_linear(x, weight, bias, lora_A, lora_B, lora_R, magnitude, scale, dropout, seed,
                                   keep_output);
  }
  return DoraLinearFunction::apply(x, weight, opt(bias.value_or(at::Tensor())), lora_A, lora_B,
                                   opt(lora_R.value_or(at::Tensor())), magnitude, scale, dropout, seed, keep_output);
}

at::Tensor dora_linear_no_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                               const std::optional<at::Tensor>& lora_R, const at::Tensor& magnitude, double scale,
                               double dropout, int64_t seed, bool /*keep_output: nothing is kept without grad*/) {
  if (auto y = detail::dora_linear_merged(x, weight, bias, lora_A, lora_B, lora_R, magnitude, scale, dropout)) {
    return *y;
  }
  return std::get<0>(dora_forward_op().call(x, weight, bias, lora_A, lora_B, lora_R, magnitude, scale, dropout, seed));
}

const auto& grouped_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_linear_grouped_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, double, int64_t)>();
  return op;
}

const auto& grouped_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_linear_grouped_backward", "")
                       .typed<std::vector<at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, double,
                           int64_t, std::array<bool, 5>)>();
  return op;
}

const auto& experts_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_experts_linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double, double, int64_t)>();
  return op;
}

const auto& experts_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_experts_linear_backward", "")
                       .typed<std::vector<at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, int64_t,
                           std::array<bool, 5>)>();
  return op;
}

// The routed forms of the operator, whose rows go to different factors: mixed-adapter batches (an adapter per row,
// Op = Grouped, one scale per adapter) and MoE experts (rows sorted by expert, Op = Experts, one scale). Inputs x,
// weight, bias (optional), A, B, the routing index (group or offsets; not differentiable), then the scale(s),
// dropout, seed. Saved: x (when a gradient needs it), the weight and factors, the index and hr (N, r).
template <typename Op>
class RoutedLinearFunction : public torch::autograd::Function<RoutedLinearFunction<Op>> {
 public:
  using Scale = typename Op::Scale;

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& index, Scale scale, double dropout,
                            int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, hr] = Op::forward().call(x, weight, bias, lora_A, lora_B, index, scale, dropout, seed);
    const bool keep_x = lora_A.requires_grad() || weight.requires_grad();
    ctx->save_for_backward({keep_x ? x : at::Tensor(), weight, lora_A, lora_B, index, hr});
    ctx->saved_data["scale"] = c10::IValue(scale);
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &index = saved[4],
                     &hr = saved[5];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t b = has_bias ? 1 : 0;
    std::array<bool, 5> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                has_bias && ctx->needs_input_grad(2), ctx->needs_input_grad(2 + b),
                                ctx->needs_input_grad(3 + b)};
    const at::Tensor& grad = grad_outputs[0];
    if (!any_wanted(mask) || !grad.defined()) return variable_list(9);
    const Scale scale = Op::scale_of(ctx->saved_data["scale"]);
    const auto grads = Op::backward().call(grad, opt(x), weight, lora_A, lora_B, index, hr, scale,
                                           ctx->saved_data["dropout"].toDouble(), ctx->saved_data["seed"].toInt(),
                                           mask);
    return place(mask, grads, 9);
  }
};

struct Grouped {
  using Scale = std::vector<double>;
  static const auto& forward() { return grouped_forward_op(); }
  static const auto& backward() { return grouped_backward_op(); }
  static Scale scale_of(const c10::IValue& v) { return v.toDoubleVector(); }
};

struct Experts {
  using Scale = double;
  static const auto& forward() { return experts_forward_op(); }
  static const auto& backward() { return experts_backward_op(); }
  static Scale scale_of(const c10::IValue& v) { return v.toDouble(); }
};

at::Tensor grouped_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& group,
                            at::ArrayRef<double> scales, double dropout, int64_t seed) {
  return RoutedLinearFunction<Grouped>::apply(x, weight, opt(bias.value_or(at::Tensor())), lora_A, lora_B, group,
                                              scales.vec(), dropout, seed);
}

at::Tensor grouped_no_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& group,
                           at::ArrayRef<double> scales, double dropout, int64_t seed) {
  return std::get<0>(grouped_forward_op().call(x, weight, bias, lora_A, lora_B, group, scales, dropout, seed));
}

at::Tensor experts_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets,
                            double scale, double dropout, int64_t seed) {
  return RoutedLinearFunction<Experts>::apply(x, weight, opt(bias.value_or(at::Tensor())), lora_A, lora_B, offsets,
                                              scale, dropout, seed);
}

at::Tensor experts_no_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets,
                           double scale, double dropout, int64_t seed) {
  return std::get<0>(experts_forward_op().call(x, weight, bias, lora_A, lora_B, offsets, scale, dropout, seed));
}

}  // namespace

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                       const std::optional<at::Tensor>& lora_R, double scale, double dropout, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         double, double, int64_t)>();
  return op.call(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout, seed);
}

at::Tensor dora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_R,
                       const at::Tensor& magnitude, double scale, double dropout, int64_t seed, bool keep_output) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::dora_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, double, double, int64_t, bool)>();
  return op.call(x, weight, bias, lora_A, lora_B, lora_R, magnitude, scale, dropout, seed, keep_output);
}

at::Tensor lora_linear_grouped(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& group,
                               at::ArrayRef<double> scales, double dropout, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_linear_grouped", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::ArrayRef<double>, double, int64_t)>();
  return op.call(x, weight, bias, lora_A, lora_B, group, scales, dropout, seed);
}

at::Tensor lora_experts_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets,
                               double scale, double dropout, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lispetorch::lora_experts_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                         int64_t)>();
  return op.call(x, weight, bias, lora_A, lora_B, offsets, scale, dropout, seed);
}

}  // namespace lispetorch

TORCH_LIBRARY_IMPL(lispetorch, Autograd, m) {
  m.impl("lora_linear", &lispetorch::lora_linear_autograd);
  m.impl("dora_linear", &lispetorch::dora_linear_autograd);
  m.impl("lora_linear_grouped", &lispetorch::grouped_autograd);
  m.impl("lora_experts_linear", &lispetorch::experts_autograd);
}

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lispetorch::lora_linear_no_grad);
  m.impl("dora_linear", &lispetorch::dora_linear_no_grad);
  m.impl("lora_linear_grouped", &lispetorch::grouped_no_grad);
  m.impl("lora_experts_linear", &lispetorch::experts_no_grad);
}
