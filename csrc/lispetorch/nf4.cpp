// Blockwise quantisation with a code table, and NF4 (Dettmers et al. 2023, "QLoRA"; bitsandbytes' layout).
//
// Layout: the input is flattened row-major and cut into blocks of `blocksize` values (the last one may be
// short). Each block stores absmax = max |x| (float32); each value stores the index of the code-table entry
// nearest to x / absmax (ties go to the lower entry, as bitsandbytes' comparisons against midpoints do).
// NF4 packs two 4-bit indices per byte, the first element in the high nibble: byte k = (i₂ₖ << 4) | i₂ₖ₊₁.
#include "lispetorch.h"

#include <ATen/ATen.h>

namespace lispetorch {
namespace {

// NF4's 16 values (bitsandbytes' table: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero).
constexpr float kNF4[16] = {-1.0f,
                            -0.6961928009986877f,
                            -0.5250730514526367f,
                            -0.39491748809814453f,
                            -0.28444138169288635f,
                            -0.18477343022823334f,
                            -0.09105003625154495f,
                            0.0f,
                            0.07958029955625534f,
                            0.16093020141124725f,
                            0.24611230194568634f,
                            0.33791524171829224f,
                            0.44070982933044434f,
                            0.5626170039176941f,
                            0.7229568362236023f,
                            1.0f};

void check_code(const at::Tensor& code) {
  TORCH_CHECK(code.defined() && code.dim() == 1 && code.numel() >= 2 && code.numel() <= 256,
              "code must be a 1-D table of 2 to 256 values, got shape ", code.defined() ? code.sizes() : at::IntArrayRef{});
  TORCH_CHECK(code.scalar_type() == at::kFloat, "code must be float32, got ", code.scalar_type());
}

}  // namespace

at::Tensor nf4_code(const at::Device& device) {
  return at::tensor(at::ArrayRef<float>(kNF4, 16), at::TensorOptions().dtype(at::kFloat)).to(device);
}

std::tuple<at::Tensor, at::Tensor> blockwise_quantize(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK(x.defined() && at::isFloatingType(x.scalar_type()), "blockwise_quantize: x must be a floating-point ",
              "tensor, got ", x.defined() ? toString(x.scalar_type()) : "undefined");
  TORCH_CHECK(blocksize > 0, "blockwise_quantize: blocksize must be positive, got ", blocksize);
  check_code(code);
  TORCH_CHECK(code.device() == x.device(), "code is on ", code.device(), " but x is on ", x.device());
  const int64_t n = x.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::Tensor flat = x.reshape({-1}).to(at::kFloat);
  if (blocks * blocksize != n) flat = at::constant_pad_nd(flat, {0, blocks * blocksize - n}, 0);
  const at::Tensor b = flat.view({blocks, blocksize});                                 // (blocks, blocksize)
  const at::Tensor absmax = b.abs().amax(1);                                           // (blocks,) float32
  const at::Tensor inv = at::where(absmax > 0, absmax.reciprocal(), at::zeros_like(absmax));
  const at::Tensor normed = b * inv.unsqueeze(1);                                      // in [-1, 1]
  const at::Tensor sorted = std::get<0>(code.sort());
  const at::Tensor mids = (sorted.narrow(0, 0, sorted.numel() - 1) + sorted.narrow(0, 1, sorted.numel() - 1)) * 0.5;
  // Index of the nearest entry in the sorted table: the number of midpoints strictly below the value.
  at::Tensor pos = at::bucketize(normed, mids, /*out_int32=*/false, /*right=*/false);
  const at::Tensor order = std::get<1>(code.sort());                                   // sorted → table index
  at::Tensor index = order.index_select(0, pos.reshape({-1})).reshape({-1}).narrow(0, 0, n);
  return {index.to(at::kByte), absmax};
}

at::Tensor blockwise_dequantize(const at::Tensor& index, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, c10::ScalarType dtype) {
  TORCH_CHECK(index.defined() && index.dim() == 1 && index.scalar_type() == at::kByte,
              "blockwise_dequantize: index must be 1-D uint8, got ", index.defined() ? index.sizes() : at::IntArrayRef{});
  TORCH_CHECK(blocksize > 0, "blockwise_dequantize: blocksize must be positive, got ", blocksize);
  check_code(code);
  const int64_t n = index.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.defined() && absmax.dim() == 1 && absmax.numel() == blocks,
              "blockwise_dequantize: ", n, " values in blocks of ", blocksize, " need absmax (", blocks,
              ",), got ", absmax.defined() ? absmax.sizes() : at::IntArrayRef{});
  const at::Tensor values = code.index_select(0, index.to(at::kLong));                   // (n,)
  const at::Tensor scale = absmax.to(at::kFloat).repeat_interleave(blocksize).narrow(0, 0, n);
  return (values * scale).to(dtype);
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& x, int64_t blocksize) {
  auto [index, absmax] = blockwise_quantize(x, nf4_code(x.device()), blocksize);
  const int64_t n = index.numel();
  at::Tensor idx = n % 2 ? at::constant_pad_nd(index, {0, 1}, 0) : index;
  idx = idx.view({-1, 2});
  const at::Tensor packed = at::bitwise_or(at::bitwise_left_shift(idx.select(1, 0), 4), idx.select(1, 1));
  return {packed.contiguous(), absmax};
}

at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize,
                          c10::ScalarType dtype) {
  TORCH_CHECK(packed.defined() && packed.dim() == 1 && packed.scalar_type() == at::kByte,
              "nf4_dequantize: packed must be 1-D uint8, got ", packed.defined() ? packed.sizes() : at::IntArrayRef{});
  TORCH_CHECK(numel >= 0 && packed.numel() == (numel + 1) / 2, "nf4_dequantize: ", numel, " values need ",
              (numel + 1) / 2, " bytes, got ", packed.numel());
  const at::Tensor high = at::bitwise_right_shift(packed, 4);
  const at::Tensor low = at::bitwise_and(packed, 15);
  const at::Tensor index = at::stack({high, low}, 1).reshape({-1}).narrow(0, 0, numel);
  return blockwise_dequantize(index, absmax, nf4_code(packed.device()), blocksize, dtype);
}

}  // namespace lispetorch

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lispetorch, CompositeExplicitAutograd, m) {
  m.impl("blockwise_quantize", &lispetorch::blockwise_quantize);
  m.impl("blockwise_dequantize", &lispetorch::blockwise_dequantize);
  m.impl("nf4_quantize", &lispetorch::nf4_quantize);
  m.impl("nf4_dequantize", &lispetorch::nf4_dequantize);
}
