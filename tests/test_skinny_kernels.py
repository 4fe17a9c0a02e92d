"""The float32 CPU kernels of the fused operator's skinny products (csrc/lispetorch/skinny_cpu.cpp): the products with
A and B, the dropout mask applied as they read, and the column sums DoRA's magnitude needs. Each result is checked
against a float64 evaluation of the same formula with the same mask, element by element, within a bound on float32
rounding: 1e-5 of the sum of the absolute values of the terms that element adds up (the same formula over |inputs|),
so a missing or repeated term, about 1/K of that sum, fails. Shapes cover the vector tails (sizes not multiples of
16), ranks padded to 16 and above it, several row blocks and both vector units (AVX2 in a process of its own)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lispetorch import ops

SHAPES = [  # (rows, in, out, r); fewer than 16 rows take ATen's products, checked the same way
    (1, 16, 16, 1),
    (23, 37, 40, 17),
    (16, 16, 16, 1),
    (64, 512, 64, 16),
    (1029, 130, 33, 40),
    (300, 96, 512, 64),
]


def reference(x, W, b, A, B, s, p, seed):
    keep = ops.dropout_mask(x.detach().float(), p, seed).to(x.dtype) / (1 - p) if p > 0 else None
    xd = x * keep if keep is not None else x
    y = x @ W.T + s * (xd @ A.T) @ B.T
    return y + b if b is not None else y


def grads_of(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, g)]


def bounded(got, want, bound, what):
    err = (got.double() - want).abs()
    limit = 1e-5 * bound + 1e-30
    worst = (err / limit).max().item()
    assert worst <= 1.0, f"{what}: error up to {worst:.3g} times the rounding bound"


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_operator_in_float32_is_float64_within_rounding(shape, bias, p):
    n, inp, out, r = shape
    gen = torch.Generator().manual_seed(n + inp + out + r)
    x, W, A, B, g = (torch.randn(*s, generator=gen, dtype=torch.float64)
                     for s in ((n, inp), (out, inp), (r, inp), (out, r), (n, out)))
    b = torch.randn(out, generator=gen, dtype=torch.float64) if bias else None
    s, seed = 0.7, 4242
    args = [x, A, B] + ([b] if bias else [])

    def ours(x, A, B, *b):
        return ops.lora_linear(x, W.float(), b[0] if b else None, A, B, None, s, p, seed)

    def exact(x, A, B, *b):
        return reference(x, W, b[0] if b else None, A, B, s, p, seed)

    def magnitude(x, A, B, *b):
        return reference(x, W.abs(), b[0] if b else None, A, B, s, p, seed)

    got = grads_of(ours, [t.float() for t in args], g.float())
    want = grads_of(exact, args, g)
    bound = grads_of(magnitude, [t.abs() for t in args], g.abs())
    for name, gt, wt, bd in zip(["y", "dL/dx", "dL/dA", "dL/dB", "dL/db"], got, want, bound, strict=False):
        bounded(gt, wt, bd, name)


def test_results_do_not_depend_on_the_thread_count():
    """Threads take whole row blocks, groups of them or column stripes, so each sum runs in one order: hr, dL/dA,
    dL/dB, dL/db and DoRA's dL/dm are the same bit for bit on one thread or two (the frozen layer's products are
    BLAS's and not compared). 777 rows: several groups of row blocks and a last one cut short."""
    gen = torch.Generator().manual_seed(3)
    x, W, A, B, g = (torch.randn(*s, generator=gen) for s in ((777, 200), (96, 200), (16, 200), (96, 16), (777, 96)))
    b, m = torch.randn(96, generator=gen), torch.rand(96, generator=gen) + 0.5
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _, hr = torch.ops.lispetorch.lora_linear_forward(x, W, b, A, B, None, 0.5, 0.2, 11)
            db, dA, dB = torch.ops.lispetorch.lora_linear_backward(g, x, W, A, B, None, hr, 0.5, 0.2, 11,
                                                                   [False, False, True, True, True, False])
            leaves = [t.clone().requires_grad_() for t in (b, A, B, m)]
            y = ops.dora_linear(x, W, leaves[0], leaves[1], leaves[2], None, leaves[3], 0.5, 0.2, 11)
            results.append((hr, db, dA, dB, *torch.autograd.grad(y, leaves, g)))
    finally:
        torch.set_num_threads(threads)
    for k, (one, two) in enumerate(zip(*results, strict=True)):
        assert torch.equal(one, two), k


def dora_reference(x, W, b, A, B, m, s, p, seed):
    n = (W + s * B @ A).norm(dim=1).detach()
    keep = ops.dropout_mask(x.detach().float(), p, seed).to(x.dtype) / (1 - p) if p > 0 else None
    xd = x * keep if keep is not None else x
    y = (m / n) * (x @ W.T + s * (xd @ A.T) @ B.T)
    return y + b if b is not None else y


@pytest.mark.parametrize("keep_output", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=lambda s: "x".join(map(str, s)))
def test_dora_operator_in_float32_is_float64_within_rounding(shape, p, keep_output):
    """DoRA's row norms from one pass over W and its magnitude's column sums from the pass over G that gives dL/dB:
    the output and every gradient (x, A, B, m, b) against float64, relative to each tensor's largest value."""
    n, inp, out, r = shape
    gen = torch.Generator().manual_seed(r)
    x, W, A, g = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((n, inp), (out, inp), (r, inp),
                                                                                 (n, out)))
    B = 0.3 * torch.randn(out, r, generator=gen, dtype=torch.float64)
    m = W.norm(dim=1) * (1 + 0.1 * torch.rand(out, generator=gen, dtype=torch.float64))
    b = torch.randn(out, generator=gen, dtype=torch.float64)
    s, seed = 0.7, 77

    def ours(x, A, B, m, b):
        return ops.dora_linear(x, W.float(), b, A, B, None, m, s, p, seed, keep_output=keep_output)

    def exact(x, A, B, m, b):
        return dora_reference(x, W, b, A, B, m, s, p, seed)

    got = grads_of(ours, [t.float() for t in (x, A, B, m, b)], g.float())
    want = grads_of(exact, [x, A, B, m, b], g)
    for name, gt, wt in zip(["y", "dL/dx", "dL/dA", "dL/dB", "dL/dm", "dL/db"], got, want, strict=True):
        torch.testing.assert_close(gt.double(), wt, rtol=0, atol=1e-5 * wt.abs().max().item(), msg=name)


@pytest.mark.parametrize("case", ["lora", "core", "dora", "conv1d", "blocks", "few-rows"])
def test_inference_on_the_summed_weight_is_float64_within_rounding(case):
    """Without gradients or dropout, a batch whose rows make the adapter's products cost more than forming the sum
    (rows · (in + out) ≥ 3 · in · out) runs on W + s·B R A (each row times g for DoRA), formed a block of 2²⁰
    elements at a time, in one product: against float64 within the rounding bound, with a core R, a zero magnitude,
    W given transposed (a Conv1D's) and a weight of two blocks; and a batch too small for it (the kernels)."""
    n, inp, out, r = {"blocks": (1400, 2048, 600, 8), "few-rows": (500, 512, 512, 16)}.get(case, (300, 96, 130, 12))
    gen = torch.Generator().manual_seed(len(case))
    x, W, A = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((n, inp), (out, inp), (r, inp)))
    B = 0.3 * torch.randn(out, r, generator=gen, dtype=torch.float64)
    R = torch.randn(r, r, generator=gen, dtype=torch.float64) if case == "core" else None
    b = torch.randn(out, generator=gen, dtype=torch.float64)
    s = 0.7
    C = B @ R if R is not None else B
    if case == "dora":
        m = W.norm(dim=1) * (1 + 0.1 * torch.rand(out, generator=gen, dtype=torch.float64))
        m[3] = 0.0
        g = m / (W + s * C @ A).norm(dim=1)
        want = g * (x @ W.T + s * (x @ A.T) @ C.T) + b
        bound = g.abs() * (x.abs() @ W.abs().T + s * (x.abs() @ A.abs().T) @ C.abs().T) + b.abs()
    else:
        want = x @ W.T + s * (x @ A.T) @ C.T + b
        bound = x.abs() @ W.abs().T + s * (x.abs() @ A.abs().T) @ C.abs().T + b.abs()
    Wf = W.float().T.contiguous().T if case == "conv1d" else W.float()  # (out, in) as a transposed view
    f = [t.float() if t is not None else None for t in (x, A, B, R, b)]
    with torch.no_grad():
        if case == "dora":
            got = ops.dora_linear(f[0], Wf, f[4], f[1], f[2], f[3], m.float(), s, 0.0, 0)
        else:
            got = ops.lora_linear(f[0], Wf, f[4], f[1], f[2], f[3], s, 0.0, 0)
    bounded(got, want, bound, case)
    if case == "dora":
        assert torch.equal(got[:, 3], f[4][3].expand(n))  # g = 0: the bias alone


def test_avx2_kernels_and_aten_in_processes_of_their_own():
    """The kernels are chosen once per process: the AVX2 ones (LISPETORCH_ISA=avx2) run this file's float64 checks
    in a process of their own (this machine's own choice is the widest it has), and under LISPETORCH_ISA=aten the
    operators take ATen's products and pass the same checks."""
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', "
            "'(within_rounding and not 300x) or row_norms', 'test_skinny_kernels.py']))")
    for isa in ("avx2", "aten"):
        env = {**os.environ, "LISPETORCH_ISA": isa}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                              cwd=os.path.dirname(__file__))
        assert done.returncode == 0, isa + ": " + done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("with_R", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 1), (40, 37, 17), (512, 512, 16), (33, 130, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dora_row_norms_are_the_norms_of_the_sum(shape, with_R):
    """‖Wᵢ + s·(B R A)ᵢ‖ with the sum's rows formed in registers, never stored: against the float64 norms of the
    formed sum, within float32 rounding of ‖Wᵢ‖ + s‖(B R A)ᵢ‖."""
    out, inp, r = shape
    gen = torch.Generator().manual_seed(out * inp)
    W, A, B = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((out, inp), (r, inp), (out, r)))
    R = torch.eye(r, dtype=torch.float64) + 0.1 * torch.randn(r, r, generator=gen, dtype=torch.float64) \
        if with_R else None
    delta = 0.7 * (B @ R if with_R else B) @ A
    want = (W + delta).norm(dim=1)
    got = ops.dora_norm(W.float(), A.float(), B.float(), R.float() if with_R else None, 0.7)
    bounded(got, want, W.norm(dim=1) + delta.norm(dim=1), "row norms")


@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32)])
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(shape):
    """No rows: every parameter's gradient is exactly 0 (sums over no rows), for LoRA and DoRA (keeping its output or
    not), each gradient asked for alone too (the magnitude's alone takes the column sums' pass without dL/dB)."""
    gen = torch.Generator().manual_seed(5)
    W, A, B = (torch.randn(*s, generator=gen) for s in ((8, 32), (4, 32), (8, 4)))
    m, b = W.norm(dim=1), torch.randn(8, generator=gen)
    for dora, keep in ((False, True), (True, True), (True, False)):
        params = [A, B, b] + ([m] if dora else [])
        for wanted in [params, *([p] for p in params)]:
            leaves = [p.clone().requires_grad_(any(p is w for w in wanted)) for p in params]
            x = torch.randn(*shape, requires_grad=True)
            y = (ops.dora_linear(x, W, leaves[2], leaves[0], leaves[1], None, leaves[3], 0.5, 0.1, 3, keep) if dora
                 else ops.lora_linear(x, W, leaves[2], leaves[0], leaves[1], None, 0.5, 0.1, 3))
            assert y.shape == (*shape[:-1], 8)
            y.sum().backward()
            for leaf in leaves:
                if leaf.requires_grad:
                    assert torch.equal(leaf.grad, torch.zeros_like(leaf)), (dora, leaf.shape)
