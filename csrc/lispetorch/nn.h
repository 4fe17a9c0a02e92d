// Header-only torch::nn front end of the core library for C++ programs: a LoRA adapter around a
// torch::nn::Linear, and a helper that adapts every Linear of a module tree. The math is lispetorch::lora_linear
// (forward and backward) and lispetorch::lora_merge_ / lora_unmerge_ (exact round trip).
#pragma once

#include <torch/torch.h>

#include "lispetorch.h"

#include <limits>
#include <string>
#include <vector>

namespace lispetorch {

// y = base(x) + (alpha / rank) · B A drop(x); A (rank, in) Kaiming-uniform, B (out, rank) zeros.
struct LoraLinearImpl : torch::nn::Module {
  LoraLinearImpl(torch::nn::Linear base_layer, int64_t rank, double alpha, double dropout = 0.0)
      : base(register_module("base_layer", std::move(base_layer))),
        scale(alpha / static_cast<double>(rank)),
        dropout_p(dropout) {
    TORCH_CHECK(rank > 0, "rank must be positive, got ", rank);
    TORCH_CHECK(alpha > 0, "alpha must be positive, got ", alpha);
    TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, "dropout must be in [0, 1), got ", dropout);
    const auto& w = base->weight;
    for (auto& p : base->parameters()) p.set_requires_grad(false);
    A = register_parameter("lora_A", torch::empty({rank, w.size(1)}, w.options()));
    B = register_parameter("lora_B", torch::zeros({w.size(0), rank}, w.options()));
    torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    if (merged) return base->forward(x);
    const double p = is_training() ? dropout_p : 0.0;
    const int64_t seed = p > 0.0 ? torch::randint(std::numeric_limits<int64_t>::max(), {}, torch::kLong).item<int64_t>() : 0;
    std::optional<at::Tensor> bias;
    if (base->bias.defined()) bias = base->bias;
    return lora_linear(x, base->weight, bias, A, B, std::nullopt, scale, p, seed);
  }

  void merge() {
    if (merged) return;
    torch::NoGradGuard no_grad;
    std::tie(distance, index, values) = lora_merge_(base->weight, A, B, std::nullopt, scale, /*safe=*/true);
    merged = true;
  }

  void unmerge() {
    if (!merged) return;
    torch::NoGradGuard no_grad;
    lora_unmerge_(base->weight, A, B, std::nullopt, scale, distance, index, values);
    distance = index = values = torch::Tensor();
    merged = false;
  }

  torch::nn::Linear base;
  torch::Tensor A, B, distance, index, values;  // merge state: see lora_merge_
  double scale, dropout_p;
  bool merged = false;
};
TORCH_MODULE(LoraLinear);

// Replaces every torch::nn::Linear below `module` by a LoraLinear wrapping it; returns the adapters.
inline std::vector<LoraLinear> inject_lora(torch::nn::Module& module, int64_t rank, double alpha,
                                           double dropout = 0.0) {
  std::vector<LoraLinear> adapters;
  for (auto& item : module.named_children()) {
    const std::string name = item.key();
    auto child = item.value();
    if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(child)) {
      LoraLinear adapter(torch::nn::Linear(linear), rank, alpha, dropout);
      module.replace_module(name, adapter);
      adapters.push_back(adapter);
    } else if (!std::dynamic_pointer_cast<LoraLinearImpl>(child)) {
      auto inner = inject_lora(*child, rank, alpha, dropout);
      adapters.insert(adapters.end(), inner.begin(), inner.end());
    }
  }
  for (auto& p : module.parameters()) p.set_requires_grad(false);
  for (auto& a : adapters) {
    a->A.set_requires_grad(true);
    a->B.set_requires_grad(true);
  }
  return adapters;
}

}  // namespace lispetorch
