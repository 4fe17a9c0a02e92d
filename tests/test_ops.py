"""The native operator against a plain-PyTorch reference: outputs, gradients, gradcheck, opcheck, dropout."""

from __future__ import annotations

import pytest
import torch
from conftest import saved_bytes

import lispetorch as lt
from lispetorch import ops


def reference(x, W, b, A, B, R, scale, p, seed):
    """y = x Wᵀ + b + s·((drop(x) Aᵀ) Rᵀ) Bᵀ in plain PyTorch, with the operator's own mask."""
    xd = x * ops.dropout_mask(x, p, seed) * (1.0 / (1.0 - p)) if p > 0 else x
    h = xd @ A.T
    if R is not None:
        h = h @ R.T
    y = x @ W.T + h @ B.T * scale
    return y + b if b is not None else y


def make(shape=(3, 5, 16), out=12, r=4, dtype=torch.float32, bias=True, with_R=True, grad_x=True):
    x = torch.randn(*shape, dtype=dtype, requires_grad=grad_x)
    inp = shape[-1]
    W = torch.randn(out, inp, dtype=dtype) / inp**0.5
    b = torch.randn(out, dtype=dtype) if bias else None
    A = (torch.randn(r, inp, dtype=dtype) / inp**0.5).requires_grad_()
    B = (torch.randn(out, r, dtype=dtype) / r**0.5).requires_grad_()
    R = (torch.eye(r, dtype=dtype) + 0.1 * torch.randn(r, r, dtype=dtype)).requires_grad_() if with_R else None
    return x, W, b, A, B, R


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_R", [True, False])
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 16), (2, 2, 2, 16)])
def test_forward_and_gradients_match_reference(p, bias, with_R, shape):
    x, W, b, A, B, R = make(shape, bias=bias, with_R=with_R)
    leaves = [t for t in (x, A, B, R) if t is not None]
    y = ops.lora_linear(x, W, b, A, B, R, 0.7, p, 1234)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    y_ref = reference(x, W, b, A, B, R, 0.7, p, 1234)
    grads_ref = torch.autograd.grad(y_ref, leaves, g)
    assert y.shape == (*shape[:-1], 12)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_float64(p):
    x, W, b, A, B, R = make((2, 3, 8), out=6, r=3, dtype=torch.float64)

    def f(x, A, B, R):
        return ops.lora_linear(x, W, b, A, B, R, 0.5, p, 99)

    assert torch.autograd.gradcheck(f, (x, A, B, R))


def test_gradients_only_for_inputs_that_require_them():
    x, W, b, A, B, R = make(with_R=False, grad_x=False)
    A.requires_grad_(False)
    y = ops.lora_linear(x, W, b, A, B, None, 1.0, 0.1, 5)
    y.sum().backward()
    assert B.grad is not None and A.grad is None and x.grad is None
    W.requires_grad_(True)
    b.requires_grad_(True)
    y = ops.lora_linear(x, W, b, A, B, None, 1.0, 0.1, 5)
    y_ref = reference(x, W, b, A, B, None, 1.0, 0.1, 5)
    gw, gb = torch.autograd.grad(y.sum(), (W, b))
    gw_ref, gb_ref = torch.autograd.grad(y_ref.sum(), (W, b))
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gb, gb_ref)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(p):
    x, W, b, A, B, R = make((2, 4, 16))
    torch.library.opcheck(torch.ops.lispetorch.lora_linear.default, (x, W, b, A, B, R, 0.5, p, 7))
    torch.library.opcheck(torch.ops.lispetorch.lora_linear.default, (x, W, None, A, B, None, 2.0, p, 7))
    torch.library.opcheck(torch.ops.lispetorch.dropout.default, (x.detach(), 0.2, 3))
    torch.library.opcheck(torch.ops.lispetorch.lora_delta.default, (A.detach(), B.detach(), None, 2.0, torch.float32))


def test_backward_uses_the_forward_mask():
    # With W = 0, A = B = I and s = 1 the layer is y = drop(x): the forward mask is visible in y, and
    # backward must give dL/dx = g · keep / (1 - p) with that same mask.
    n, p = 64, 0.5
    x = (torch.rand(8, n) + 0.5).requires_grad_()
    eye = torch.eye(n)
    A, B = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    y = ops.lora_linear(x, torch.zeros(n, n), None, A, B, None, 1.0, p, 2024)
    keep = y.detach() != 0
    assert 0.3 < keep.float().mean() < 0.7
    torch.testing.assert_close(y.detach(), x.detach() * keep / (1 - p))
    g = torch.randn_like(y)
    gx, gA = torch.autograd.grad(y, (x, A), g)
    torch.testing.assert_close(gx, g * keep / (1 - p))
    torch.testing.assert_close(gA, g.T @ (x.detach() * keep / (1 - p)))
    # and a different seed gives a different mask
    y2 = ops.lora_linear(x, torch.zeros(n, n), None, A, B, None, 1.0, p, 2025)
    assert not torch.equal(y2.detach() != 0, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 1000, 1024 * 5 + 3])
def test_fused_cpu_dropout_equals_generic_mask(dtype, n):
    x = torch.randn(n, dtype=dtype)
    for p in (0.05, 0.5, 0.9):
        keep = ops.dropout_mask(x, p, 77)
        assert torch.equal(ops.dropout(x, p, 77), x * keep * (1.0 / (1.0 - p)))
    big = ops.dropout_mask(torch.empty(200_000), 0.25, 1)
    assert abs(big.float().mean().item() - 0.75) < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_is_close(dtype):
    x, W, b, A, B, R = make((4, 16), dtype=torch.float32)
    y32 = ops.lora_linear(x, W, b, A, B, R, 0.5, 0.0, 0)
    cast = [t.detach().to(dtype) if t is not None else None for t in (x, W, b, A, B, R)]
    y = ops.lora_linear(*cast, 0.5, 0.0, 0)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)
    xl = cast[0].clone().requires_grad_()
    Al = cast[3].clone().requires_grad_()
    ops.lora_linear(xl, cast[1], cast[2], Al, cast[4], cast[5], 0.5, 0.1, 3).sum().backward()
    assert xl.grad.dtype == dtype and Al.grad.dtype == dtype


def test_dropout_saves_no_activation():
    x, W, b, A, B, _ = make((256, 64), out=64, r=4)
    without = saved_bytes(lambda: ops.lora_linear(x, W, b, A, B, None, 1.0, 0.0, 0))
    with_dropout = saved_bytes(lambda: ops.lora_linear(x, W, b, A, B, None, 1.0, 0.1, 0))
    assert with_dropout == without
    # what is saved: the input (256×64), hr (256×4) and the factors; no dropped copy of x
    floats = 256 * 64 + 256 * 4 + W.numel() + A.numel() + B.numel()
    assert without == 4 * floats


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=torch.randn(3, 5)), "input has 5 features"),
        (lambda a: a.update(A=torch.randn(4, 9)), "lora_A has 9 columns"),
        (lambda a: a.update(B=torch.randn(11, 4)), "lora_B has 11 rows"),
        (lambda a: a.update(B=torch.randn(12, 3)), "lora_B has 3 columns"),
        (lambda a: a.update(R=torch.randn(3, 3)), "lora_R must be (r, r)"),
        (lambda a: a.update(b=torch.randn(5)), "bias must be (out,)"),
        (lambda a: a.update(p=1.0), "dropout must be in [0, 1)"),
        (lambda a: a.update(x=torch.randn(3, 16, dtype=torch.float64)), "input is Double but weight is Float"),
        (lambda a: a.update(x=torch.randint(0, 3, (3, 16))), "input must be a floating-point tensor"),
    ],
)
def test_bad_inputs_raise_with_message(change, message):
    x, W, b, A, B, R = make((3, 16), grad_x=False)
    args = dict(x=x, W=W, b=b, A=A, B=B, R=R, p=0.0)
    change(args)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ops.lora_linear(args["x"], args["W"], args["b"], args["A"], args["B"], args["R"], 1.0, args["p"], 0)


# --- merge / unmerge --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unmerge_is_bit_exact_after_1000_cycles(dtype):
    W = torch.randn(96, 80).to(dtype)
    W0 = W.clone()
    A = (torch.randn(8, 80) * 0.2).to(dtype)
    B = (torch.randn(96, 8) * 0.2).to(dtype)
    merged_once = None
    for _ in range(1000):
        state = ops.lora_merge_(W, A, B, None, 2.0)
        if merged_once is None:
            merged_once = W.clone()
        ops.lora_unmerge_(W, A, B, None, 2.0, state)
    assert torch.equal(W, W0)
    # the merge itself is W + s·BA rounded once from fp32
    want = (W0.float() + 2.0 * B.float() @ A.float()).to(dtype)
    assert torch.equal(merged_once, want)


def test_merge_exceptions_cover_tiny_weights():
    W = torch.randn(32, 32).bfloat16()
    W[0, :8] = 1e-30  # far smaller than the delta added to them
    W0 = W.clone()
    A, B = torch.ones(2, 32).bfloat16(), torch.ones(32, 2).bfloat16()
    distance, index, values = ops.lora_merge_(W, A, B, None, 0.5)
    assert distance.dtype == torch.int8 and index.shape[0] >= 8
    ops.lora_unmerge_(W, A, B, None, 0.5, (distance, index, values))
    assert torch.equal(W, W0)


def test_unmerge_without_state_subtracts():
    W = torch.randn(8, 8)
    W0 = W.clone()
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    ops.lora_merge_(W, A, B, None, 1.0)
    ops.lora_unmerge_(W, A, B, None, 1.0, None)
    torch.testing.assert_close(W, W0, atol=1e-5, rtol=0)


def test_safe_merge_refuses_nan_and_leaves_weight():
    W = torch.randn(4, 4)
    W0 = W.clone()
    A, B = torch.full((1, 4), 1e30), torch.full((4, 1), 1e30)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ops.lora_merge_(W, A, B, None, 1.0, safe=True)
    assert torch.equal(W, W0)


def test_delta_and_merge_with_R():
    A, B, R = torch.randn(3, 10), torch.randn(7, 3), torch.randn(3, 3)
    torch.testing.assert_close(ops.lora_delta(A, B, R, 0.5), 0.5 * B @ R @ A)
    W = torch.zeros(7, 10)
    ops.lora_merge_(W, A, B, R, 0.5)
    torch.testing.assert_close(W, 0.5 * B @ R @ A)


def test_public_names():
    assert callable(lt.ops.lora_linear) and lt.LoraConfig().r == 8


def test_opcheck_merge_and_unmerge():
    _, W, _, A, B, R = make(out=12, r=4)
    A, B, R = A.detach(), B.detach(), R.detach()
    torch.library.opcheck(torch.ops.lispetorch.lora_merge_.default, (W.clone(), A, B, R, 0.5, True))
    merged = W.clone()
    distance, index, values = ops.lora_merge_(merged, A, B, R, 0.5)
    torch.library.opcheck(torch.ops.lispetorch.lora_unmerge_.default,
                          (merged.clone(), A, B, R, 0.5, distance, index, values))
    torch.library.opcheck(torch.ops.lispetorch.lora_unmerge_.default, (merged.clone(), A, B, None, 0.5, None, None,
                                                                         None))


def _nf4_inputs(with_R=True, bias=True):
    x, W, b, A, B, R = make((2, 3, 64), out=48, r=4, bias=bias, with_R=with_R)
    packed, absmax = ops.nf4_quantize(W, 64)
    W_q = ops.nf4_dequantize(packed, absmax, W.numel(), 64, W.dtype).view_as(W)  # the weight the op computes with
    return x, W_q, b, A, B, R, packed, absmax


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_R", [True, False])
def test_nf4_lora_linear_matches_the_operator_over_the_dequantised_weight(p, with_R):
    x, W_q, b, A, B, R, packed, absmax = _nf4_inputs(with_R=with_R)
    leaves = [t for t in (x, A, B, R) if t is not None]
    y = ops.nf4_lora_linear(x, packed, absmax, 48, 64, b, A, B, R, 0.7, p, 11)
    y_ref = ops.lora_linear(x, W_q, b, A, B, R, 0.7, p, 11)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_nf4_lora_linear(p):
    x, _, b, A, B, R, packed, absmax = _nf4_inputs()
    op = torch.ops.lispetorch.nf4_lora_linear.default
    torch.library.opcheck(op, (x, packed, absmax, 48, 64, b, A, B, R, 0.5, p, 7))
    torch.library.opcheck(op, (x, packed, absmax, 48, 64, None, A, B, None, 2.0, p, 7))


@pytest.mark.parametrize("with_R", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lora_linear_over_several_row_blocks_matches_the_plain_composition(with_R, p, dtype):
    # 512 features make blocks of 128 rows on CPU: 300 rows are three blocks, the last one partial; every gradient
    # (W and b included) against the same sum written with torch ops and the operator's own mask
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).requires_grad_()

    x, W, b = rnd(3, 100, 512), rnd(512, 512, std=0.05), rnd(512)
    A, B = rnd(16, 512, std=0.05), rnd(512, 16, std=0.05)
    R = rnd(16, 16, std=0.3) if with_R else None
    y = ops.lora_linear(x, W, b, A, B, R, 0.5, p, 77)
    mask = ops.dropout_mask(x.detach().reshape(-1, 512), p, 77).view(x.shape) if p > 0 else torch.ones_like(x)
    xd = x * mask / (1 - p)
    h = xd @ A.T
    if R is not None:
        h = h @ R.T
    y_ref = x @ W.T + b + 0.5 * h @ B.T
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(y, y_ref, **tol)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    inputs = [t for t in (x, W, b, A, B, R) if t is not None]
    for ours, ref in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(y_ref, inputs, gy, retain_graph=True),
                         strict=True):
        torch.testing.assert_close(ours, ref, **(tol if dtype == torch.float64 else dict(rtol=0.05, atol=0.5)))
    # only some gradients asked for: each path through the blocks
    for wanted in ([x], [A], [B], [x, B], [A, B]):
        for ours, ref in zip(torch.autograd.grad(ops.lora_linear(x, W, b, A, B, R, 0.5, p, 77), wanted, gy),
                             torch.autograd.grad(y_ref, wanted, gy, retain_graph=True), strict=True):
            torch.testing.assert_close(ours, ref, **(tol if dtype == torch.float64 else dict(rtol=0.05, atol=0.5)))


def test_fused_float32_dropout_over_many_threads_equals_generic_mask():
    """float32's fused loop (draw and multiply in one pass, compiled for the widest vector unit) over inputs that
    several threads share: the same mask as the generic integer path, bit for bit, forward and backward."""
    x = torch.randn(100_003)
    keep = ops.dropout_mask(x, 0.3, 5)
    assert torch.equal(ops.dropout(x, 0.3, 5), x * keep * (1.0 / 0.7))
    x2 = torch.randn(300, 512, requires_grad=True)
    A = torch.randn(4, 512, requires_grad=True)
    B = torch.randn(64, 4)
    g = torch.randn(300, 64)
    ops.lora_linear(x2, torch.zeros(64, 512), None, A, B, None, 1.0, 0.3, 9).backward(g)
    keep2 = ops.dropout_mask(x2.detach(), 0.3, 9)
    gh = g @ B  # (300, 4)
    torch.testing.assert_close(x2.grad, (gh @ A.detach()) * keep2 / 0.7, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(A.grad, gh.T @ (x2.detach() * keep2 / 0.7), rtol=1e-5, atol=1e-4)
