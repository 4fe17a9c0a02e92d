// Input validation shared by the operator, merge and unmerge: one place, a message for every check.
#include "lispetorch.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace lispetorch::detail {

namespace {
void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
}
}  // namespace

void check_factors(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const std::optional<at::Tensor>& lora_R, double scale) {
  check_floating(weight, "weight");
  check_floating(lora_A, "lora_A");
  check_floating(lora_B, "lora_B");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (out, in), got shape ", weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2, "lora_A must be 2-D (r, in), got shape ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2, "lora_B must be 2-D (out, r), got shape ", lora_B.sizes());
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(r > 0, "lora_A has rank 0 (shape ", lora_A.sizes(), ")");
  TORCH_CHECK(lora_A.size(1) == in, "lora_A has ", lora_A.size(1), " columns but weight has ", in,
              " input features (lora_A ", lora_A.sizes(), ", weight ", weight.sizes(), ")");
  TORCH_CHECK(lora_B.size(0) == out, "lora_B has ", lora_B.size(0), " rows but weight has ", out,
              " output features (lora_B ", lora_B.sizes(), ", weight ", weight.sizes(), ")");
  TORCH_CHECK(lora_B.size(1) == r, "lora_B has ", lora_B.size(1), " columns but lora_A has rank ", r,
              " (lora_B ", lora_B.sizes(), ", lora_A ", lora_A.sizes(), ")");
  TORCH_CHECK(lora_A.scalar_type() == lora_B.scalar_type(), "lora_A is ", lora_A.scalar_type(), " but lora_B is ",
              lora_B.scalar_type());
  TORCH_CHECK(lora_A.device() == weight.device() && lora_B.device() == weight.device(), "weight is on ",
              weight.device(), " but lora_A is on ", lora_A.device(), " and lora_B on ", lora_B.device());
  if (lora_R.has_value() && lora_R->defined()) {
    const at::Tensor& R = *lora_R;
    check_floating(R, "lora_R");
    TORCH_CHECK(R.dim() == 2 && R.size(0) == r && R.size(1) == r, "lora_R must be (r, r) = (", r, ", ", r,
                "), got shape ", R.sizes());
    TORCH_CHECK(R.scalar_type() == lora_A.scalar_type(), "lora_R is ", R.scalar_type(), " but lora_A is ",
                lora_A.scalar_type());
    TORCH_CHECK(R.device() == weight.device(), "weight is on ", weight.device(), " but lora_R is on ", R.device());
  }
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
}

void check_lora_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                       const std::optional<at::Tensor>& lora_R, double scale, double dropout) {
  check_floating(x, "input");
  check_factors(weight, lora_A, lora_B, lora_R, scale);
  TORCH_CHECK(x.dim() >= 1, "input must have at least one dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == weight.size(1), "input has ", x.size(-1), " features (shape ", x.sizes(),
              ") but weight expects ", weight.size(1), " (weight ", weight.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "input is ", x.scalar_type(), " but weight is ",
              weight.scalar_type());
  TORCH_CHECK(x.scalar_type() == lora_A.scalar_type(), "input is ", x.scalar_type(), " but lora_A is ",
              lora_A.scalar_type(), " (cast the adapter or the input first)");
  TORCH_CHECK(x.device() == weight.device(), "input is on ", x.device(), " but weight is on ", weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be (out,) = (", weight.size(0),
                ",), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "bias is ", bias->scalar_type(), " but weight is ",
                weight.scalar_type());
    TORCH_CHECK(bias->device() == weight.device(), "bias is on ", bias->device(), " but weight is on ",
                weight.device());
  }
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, "dropout must be in [0, 1), got ", dropout);
}

}  // namespace lispetorch::detail
