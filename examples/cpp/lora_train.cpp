// Trains LoRA adapters on a small torch::nn model with the lispetorch core library, then merges them and
// checks that the merged model computes what the adapted one does, and that unmerge restores the weights.
#include <lispetorch/nn.h>
#include <torch/torch.h>

#include <cstdio>

// A small MLP whose forward looks its layers up by name, so that inject_lora's replacements take effect.
struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    register_module("fc1", torch::nn::Linear(32, 64));
    register_module("fc2", torch::nn::Linear(64, 64));
    register_module("head", torch::nn::Linear(64, 8));
  }
  torch::Tensor layer(const std::string& name, const torch::Tensor& x) {
    auto m = named_children()[name];
    if (auto lora = std::dynamic_pointer_cast<lispetorch::LoraLinearImpl>(m)) return lora->forward(x);
    return std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)->forward(x);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return layer("head", torch::gelu(layer("fc2", torch::gelu(layer("fc1", x)))));
  }
};
TORCH_MODULE(Mlp);

int main() {
  torch::manual_seed(0);
  Mlp net;
  const auto x = torch::randn({256, 32});
  const auto target = torch::randn({256, 8});

  auto adapters = lispetorch::inject_lora(*net, /*rank=*/4, /*alpha=*/8.0, /*dropout=*/0.1);
  std::vector<torch::Tensor> params;
  for (auto& p : net->parameters())
    if (p.requires_grad()) params.push_back(p);
  std::printf("adapted %zu linear layers, %zu trainable tensors\n", adapters.size(), params.size());
  if (adapters.size() != 3 || params.size() != 6) return 1;

  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  double first = 0, last = 0;
  net->train();
  for (int step = 0; step < 60; ++step) {
    opt.zero_grad();
    auto loss = torch::mse_loss(net->forward(x), target);
    loss.backward();
    opt.step();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  std::printf("loss %.4f -> %.4f\n", first, last);
  if (!(last < first)) return 2;

  net->eval();
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> before;
  for (auto& a : adapters) before.push_back(a->base->weight.clone());
  const auto unmerged = net->forward(x);
  for (auto& a : adapters) a->merge();
  const auto merged = net->forward(x);
  const double diff = (merged - unmerged).abs().max().item<double>();
  std::printf("max |merged - unmerged| = %.3g\n", diff);
  for (auto& a : adapters) a->unmerge();
  bool exact = true;
  for (size_t i = 0; i < adapters.size(); ++i) exact = exact && torch::equal(adapters[i]->base->weight, before[i]);
  std::printf("unmerge restores the weights bit for bit: %s\n", exact ? "yes" : "no");
  if (diff > 1e-4 || !exact) return 3;

  // Bad input raises a c10::Error with a message, never a crash.
  try {
    lispetorch::lora_linear(torch::randn({2, 5}), adapters[0]->base->weight, std::nullopt, adapters[0]->A,
                            adapters[0]->B, std::nullopt, 1.0, 0.0, 0);
    return 4;
  } catch (const c10::Error& e) {
    std::printf("bad input: %s\n", e.what_without_backtrace());
  }
  std::printf("ok\n");
  return 0;
}
