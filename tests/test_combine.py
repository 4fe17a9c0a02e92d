"""The LoRA checkpoint optimizer: the fused Gram and factored SVD against dense float64 references, the solver
against its KKT conditions and scipy, the built adapters against the exact weighted sum (through the real PEFT
package), the command line, and every bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import load, logits

import lispetorch as lt
from lispetorch import combine, ops
from lispetorch.cli import main as cli_main

peft = pytest.importorskip("peft")
scipy_optimize = pytest.importorskip("scipy.optimize")

PREFIX = "base_model.model."


# --- helpers -----------------------------------------------------------------------------------------------
def write_checkpoint(path, factors, r=None, alpha=8, use_rslora=False, rank_pattern=None, alpha_pattern=None,
                     fan_in_fan_out=False, extra_files=None):
    """A PEFT-layout checkpoint from ``{module: (A (r, in), B (out, r))}``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m, (A, B) in factors.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    r = r if r is not None else next(iter(factors.values()))[0].shape[0]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "use_rslora": use_rslora, "fan_in_fan_out": fan_in_fan_out,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
              "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, "lora_dropout": 0.0,
              "bias": "none", "base_model_name_or_path": None}
    (path / "adapter_config.json").write_text(json.dumps(config))
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return path


def random_factors(shapes, rank, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=g, dtype=dtype), torch.randn(o, rank, generator=g, dtype=dtype))
            for m, (o, i) in shapes.items()}


SHAPES = {
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.self_attn.v_proj": (8, 16),
    "model.layers.1.self_attn.q_proj": (24, 16),
    "model.layers.1.self_attn.v_proj": (8, 16),
}


def dense(factors, scale):
    return {m: scale * (B.double() @ A.double()) for m, (A, B) in factors.items()}


@pytest.fixture
def synthetic(tmp_path):
    """Three sources with unequal ranks/alphas (one rsLoRA) and a target; dense deltas for reference."""
    specs = {"single": dict(rank=2, alpha=4), "multi": dict(rank=3, alpha=12, use_rslora=True),
             "annot": dict(rank=4, alpha=8), "concat": dict(rank=4, alpha=16)}
    cfg, deltas = {}, {}
    for i, (name, s) in enumerate(specs.items()):
        f = random_factors(SHAPES, s["rank"], seed=i)
        write_checkpoint(tmp_path / name, f, alpha=s["alpha"], use_rslora=s.get("use_rslora", False))
        scale = s["alpha"] / (math.sqrt(s["rank"]) if s.get("use_rslora") else s["rank"])
        deltas[name] = dense(f, scale)
        cfg[name] = str(tmp_path / name)
    return cfg, deltas


def dense_problem(deltas, sources, target):
    X = np.stack([np.concatenate([deltas[n][m].flatten().numpy() for m in SHAPES]) for n in sources], 1)
    t = np.concatenate([deltas[target][m].flatten().numpy() for m in SHAPES])
    return X, t


# --- native operators --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gram_matches_dense_float64_with_unequal_ranks(dtype):
    g = torch.Generator().manual_seed(3)
    ranks, out, inp = [3, 7, 1, 5], 37, 29  # rectangular, so AᵢAⱼᵀ vs AⱼAᵢᵀ cannot coincide by shape
    A = [torch.randn(r, inp, generator=g).to(dtype) for r in ranks]
    B = [torch.randn(out, r, generator=g).to(dtype) for r in ranks]
    s = [0.5, 2.0, -1.25, 3.0]
    G = ops.lora_gram(A, B, s)
    assert G.dtype == torch.float64 and G.shape == (4, 4)
    D = torch.stack([(si * b.double() @ a.double()).flatten() for a, b, si in zip(A, B, s, strict=True)])
    ref = D @ D.T
    assert ((G - ref).abs().max() / ref.abs().max()).item() <= 1e-10
    assert torch.equal(G, G.T)


def check_gram_cases():
    """The kernel pads ranks to 8 and columns to the vector width, cuts 512-wide chunks and shares them between
    threads: ranks that are not multiples of 8, sizes below one vector and across several chunks, transposed
    (strided) factors and a different dtype per checkpoint all have to give the dense float64 Gram."""
    g = torch.Generator().manual_seed(11)
    for ranks, out, inp in [([1], 1, 1), ([3, 5, 1], 3, 5), ([8, 8, 8, 8], 520, 1030), ([9, 2, 16], 1300, 7)]:
        dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
        A = [torch.randn(r, inp, generator=g).to(dtypes[i % 4]) for i, r in enumerate(ranks)]
        B = [torch.randn(out, r, generator=g).to(dtypes[(i + 1) % 4]) for i, r in enumerate(ranks)]
        A[0] = A[0].T.contiguous().T  # column-major: strides (1, r)
        B[-1] = B[-1].T.contiguous().T
        s = [1.5, -0.5, 2.0, 0.25][: len(ranks)]
        D = torch.stack([(si * b.double() @ a.double()).flatten() for a, b, si in zip(A, B, s, strict=True)])
        ref = D @ D.T
        G = ops.lora_gram(A, B, s)
        assert ((G - ref).abs().max() / ref.abs().max()).item() <= 1e-12, (ranks, out, inp)
        assert torch.equal(G, G.T)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gram_kernel_shapes_strides_and_mixed_dtypes_against_dense(threads):
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_gram_cases()
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("isa", ["avx2", "aten"])
def test_gram_kernels_this_processor_would_not_choose(isa):
    # The kernel is chosen once per process: the AVX2 kernel and the ATen path, capped by LISPETORCH_ISA, run
    # the same cases in a process of their own.
    import subprocess
    import sys

    code = "import test_combine; test_combine.check_gram_cases(); print('ok')"
    env = {**os.environ, "LISPETORCH_ISA": isa}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_an_unknown_gram_kernel_cap_is_named():
    import subprocess
    import sys

    code = "import torch\nfrom lispetorch import ops\nops.lora_gram([torch.ones(1, 2)], [torch.ones(3, 1)])"
    env = {**os.environ, "LISPETORCH_ISA": "sse9"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "LISPETORCH_ISA must be avx2 or aten (or unset), got 'sse9'" in done.stderr


def test_gram_of_several_modules_in_one_call_equals_one_call_each():
    g = torch.Generator().manual_seed(12)
    shapes = [(40, 30), (7, 600), (513, 9)]  # (out, in) per module
    ranks = [[2, 3], [8, 1], [4, 4]]
    A, B, s = [], [], []
    for (out, inp), rs in zip(shapes, ranks, strict=True):
        for r in rs:
            A.append(torch.randn(r, inp, generator=g))
            B.append(torch.randn(out, r, generator=g))
            s.append(float(torch.rand(1, generator=g)) + 0.5)
    G = ops.lora_gram_modules(A, B, s, 2)
    assert G.shape == (3, 2, 2) and G.dtype == torch.float64
    for m in range(3):
        one = ops.lora_gram(A[2 * m:2 * m + 2], B[2 * m:2 * m + 2], s[2 * m:2 * m + 2])
        torch.testing.assert_close(G[m], one, rtol=1e-13, atol=0)
    with pytest.raises(RuntimeError, match=r"module 1 \(list entries 2 to 3\): lora_A\[1\] has 31 columns"):
        ops.lora_gram_modules(A[:3] + [torch.randn(1, 31)] + A[4:], B, s, 2)
    with pytest.raises(RuntimeError, match="not a multiple of checkpoints = 4"):
        ops.lora_gram_modules(A, B, s, 4)
    torch.library.opcheck(torch.ops.lispetorch.lora_gram_modules.default, (A, B, s, 2))


def test_gram_aten_path_agrees_with_the_cpu_kernel():
    # Negative views are left to the ATen path (the path of other devices and processors); negating every A
    # leaves every ⟨ΔWᵢ, ΔWⱼ⟩ as it is.
    g = torch.Generator().manual_seed(13)
    A = [torch.randn(r, 70, generator=g) for r in (3, 6)]
    B = [torch.randn(90, r, generator=g) for r in (3, 6)]
    fast = ops.lora_gram(A, B, [0.5, 2.0])
    aten = ops.lora_gram([torch._neg_view(a) for a in A], B, [0.5, 2.0])
    torch.testing.assert_close(aten, fast, rtol=1e-12, atol=0)
    mixed = ops.lora_gram([torch._neg_view(A[0]), A[1]], B, [0.5, 2.0])
    torch.testing.assert_close(mixed, fast * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_gram_of_a_nan_factor_is_not_finite():
    A = [torch.randn(2, 40), torch.randn(2, 40)]
    B = [torch.randn(30, 2), torch.randn(30, 2)]
    A[1][1, 17] = float("nan")
    G = ops.lora_gram(A, B)
    assert torch.isfinite(G[0, 0]) and not torch.isfinite(G[1, 1])


def test_gram_equal_ranks_respects_the_order_of_the_a_products():
    # With equal ranks, sum((BᵢᵀBⱼ) ⊙ (AⱼAᵢᵀ)) has the right shape and the wrong value; the op must not be that.
    g = torch.Generator().manual_seed(5)
    A = [torch.randn(4, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    B = [torch.randn(12, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    wrong = ((B[0].T @ B[1]) * (A[1] @ A[0].T)).sum()
    right = ((B[0] @ A[0]) * (B[1] @ A[1])).sum()
    assert not torch.isclose(wrong, right)
    torch.testing.assert_close(ops.lora_gram(A, B)[0, 1], right, rtol=1e-12, atol=0)


def test_gram_and_svd_opcheck():
    A = [torch.randn(2, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)]
    B = [torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.lispetorch.lora_gram.default, (A, B, [1.0, 0.5]))
    torch.library.opcheck(torch.ops.lispetorch.lora_factored_svd.default, (A, B, [1.0, 0.5], 3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("rank", [1, 4, 9, 50])
def test_factored_svd_is_the_truncated_svd_of_the_dense_sum(rank):
    g = torch.Generator().manual_seed(7)
    ranks, out, inp = [2, 4, 3], 31, 23
    A = [torch.randn(r, inp, generator=g, dtype=torch.float64) for r in ranks]
    B = [torch.randn(out, r, generator=g, dtype=torch.float64) for r in ranks]
    s = [0.3, -1.1, 2.0]
    Bo, Ao, S = ops.lora_factored_svd(A, B, s, rank)
    M = sum(si * b @ a for a, b, si in zip(A, B, s, strict=True))
    U, SS, Vh = torch.linalg.svd(M)
    q = min(rank, 9)
    assert Bo.shape == (out, q) and Ao.shape == (q, inp) and S.shape == (9,)
    torch.testing.assert_close(S, SS[:9], rtol=1e-10, atol=1e-10)
    best = U[:, :q] * SS[:q] @ Vh[:q]
    torch.testing.assert_close(Bo @ Ao, best, rtol=1e-10, atol=1e-10)
    # Eckart–Young: the error is the discarded singular values, and no other rank-q matrix does better
    err = torch.linalg.matrix_norm(M - Bo @ Ao)
    torch.testing.assert_close(err, SS[q:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)
    if q < 9:
        other = U[:, :q] * (SS[:q] * 1.01) @ Vh[:q]
        assert torch.linalg.matrix_norm(M - other) > err


def test_native_ops_reject_bad_factors_with_named_messages():
    A = [torch.randn(2, 6), torch.randn(3, 6)]
    B = [torch.randn(5, 2), torch.randn(5, 3)]
    with pytest.raises(RuntimeError, match=r"lora_A has 2 factors but lora_B has 1"):
        ops.lora_gram(A, B[:1])
    with pytest.raises(RuntimeError, match=r"lora_A\[1\] has 7 columns but lora_A\[0\] has 6"):
        ops.lora_gram([A[0], torch.randn(3, 7)], B)
    with pytest.raises(RuntimeError, match=r"lora_B\[1\] has 2 columns but lora_A\[1\] has rank 3"):
        ops.lora_gram(A, [B[0], torch.randn(5, 2)])
    with pytest.raises(RuntimeError, match=r"lora_B\[1\] has 4 rows but lora_B\[0\] has 5"):
        ops.lora_gram(A, [B[0], torch.randn(4, 3)])
    with pytest.raises(RuntimeError, match=r"scales\[0\] must be finite"):
        ops.lora_gram(A, B, [float("nan"), 1.0])
    with pytest.raises(RuntimeError, match=r"empty list"):
        ops.lora_gram([], [])
    with pytest.raises(RuntimeError, match=r"rank must be a positive integer, got 0"):
        ops.lora_factored_svd(A, B, None, 0)


# --- solver ------------------------------------------------------------------------------------------------
def _random_problem(rng, k, n=40, singular=False):
    X = rng.standard_normal((n, k))
    if singular and k > 2:
        X[:, -1] = X[:, 0] + X[:, 1]
    t = X @ rng.standard_normal(k) * 0.5 + rng.standard_normal(n)
    return X, t


@pytest.mark.parametrize("seed", range(12))
def test_simplex_solution_satisfies_kkt_and_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    k = [2, 3, 4, 6, 9, 15][seed % 6]
    X, t = _random_problem(rng, k, singular=seed % 4 == 3)
    G, b, c = X.T @ X, X.T @ t, float(t @ t)
    sol = combine.solve(G, b, c, "simplex")
    assert sol.kkt["satisfied"], sol.kkt
    assert abs(sol.weights.sum() - 1) < 1e-12 and sol.weights.min() >= 0
    np.testing.assert_allclose(sol.objective, np.sum((X @ sol.weights - t) ** 2), rtol=1e-9)
    ref = scipy_optimize.minimize(lambda w: np.sum((X @ w - t) ** 2), np.full(k, 1 / k), method="SLSQP",
                                  bounds=[(0, None)] * k, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                                  options={"ftol": 1e-15, "maxiter": 1000})
    assert sol.objective <= ref.fun * (1 + 1e-7) + 1e-9
    if seed % 4 != 3:  # G positive definite: the minimiser is unique
        np.testing.assert_allclose(sol.weights, ref.x, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_nonnegative_solution_matches_scipy_nnls(seed):
    rng = np.random.default_rng(100 + seed)
    k = [2, 3, 5, 8][seed % 4]
    X, t = _random_problem(rng, k)
    sol = combine.solve(X.T @ X, X.T @ t, float(t @ t), "nonnegative")
    assert sol.kkt["satisfied"], sol.kkt
    ref, _ = scipy_optimize.nnls(X, t)
    np.testing.assert_allclose(sol.weights, ref, atol=1e-8)


def test_unconstrained_solution_is_least_squares_and_kkt_detects_a_wrong_point():
    rng = np.random.default_rng(1)
    X, t = _random_problem(rng, 5)
    G, b = X.T @ X, X.T @ t
    sol = combine.solve(G, b, float(t @ t), "unconstrained")
    np.testing.assert_allclose(sol.weights, np.linalg.lstsq(X, t, rcond=None)[0], atol=1e-10)
    assert sol.kkt["satisfied"]
    # the check is not vacuous: a feasible non-optimal point fails it
    assert not combine.kkt(G, b, np.full(5, 0.2), "simplex")["satisfied"]
    assert not combine.kkt(G, b, np.full(5, 0.2), "nonnegative")["satisfied"]
    with pytest.raises(ValueError, match="constraint must be one of"):
        combine.solve(G, b, 0.0, "convex")
    with pytest.raises(ValueError, match="NaN or Inf"):
        combine.solve(G * np.nan, b)


def test_solver_recovers_an_exact_convex_combination():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((50, 4))
    w = np.array([0.1, 0.0, 0.6, 0.3])
    t = X @ w
    sol = combine.solve(X.T @ X, X.T @ t, float(t @ t))
    np.testing.assert_allclose(sol.weights, w, atol=1e-10)
    assert sol.objective < 1e-18 * float(t @ t) + 1e-12


# --- optimize ----------------------------------------------------------------------------------------------
def test_optimize_matches_the_dense_problem(synthetic, tmp_path):
    cfg, deltas = synthetic
    r = combine.optimize(cfg, "concat", layerwise=True)
    assert r["checkpoint_names"] == ["single", "multi", "annot"]
    X, t = dense_problem(deltas, ["single", "multi", "annot"], "concat")
    G, b = X.T @ X, X.T @ t
    np.testing.assert_allclose(np.array(r["gram"]["G"]), G, rtol=1e-10)
    np.testing.assert_allclose(np.array(r["gram"]["b"]), b, rtol=1e-10)
    ref = scipy_optimize.minimize(lambda w: np.sum((X @ w - t) ** 2), np.full(3, 1 / 3), method="SLSQP",
                                  bounds=[(0, None)] * 3, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                                  options={"ftol": 1e-15})
    np.testing.assert_allclose(r["global_weights"], ref.x, atol=1e-5)
    ev = r["evaluation"]
    resid = np.linalg.norm(X @ np.array(r["global_weights"]) - t)
    np.testing.assert_allclose(ev["residual_norm"], resid, rtol=1e-9)
    np.testing.assert_allclose(ev["relative_error"], resid / np.linalg.norm(t), rtol=1e-9)
    np.testing.assert_allclose(ev["r_squared"], 1 - (resid / np.linalg.norm(t)) ** 2, rtol=1e-9)
    np.testing.assert_allclose(ev["objective_value"], resid**2, rtol=1e-9)
    assert ev["constraint_violation"] < 1e-12 and r["kkt"]["satisfied"]
    assert r["method"] == "simplex_active_set" and r["num_modules"] == 4
    assert r["total_elements"] == sum(o * i for o, i in SHAPES.values())
    assert set(r["timings"]) >= {"read_s", "gram_s", "solve_s", "total_s"}
    # per-module breakdown adds up to the total residual
    per = r["modules"]
    np.testing.assert_allclose(sum(v["residual_norm"] ** 2 for v in per.values()), resid**2, rtol=1e-9)
    m0 = "model.layers.0.self_attn.q_proj"
    d = sum(w * deltas[n][m0] for n, w in r["weights"].items()) - deltas["concat"][m0]
    np.testing.assert_allclose(per[m0]["residual_norm"], float(torch.linalg.matrix_norm(d)), rtol=1e-9)
    # layerwise: each module solved on its own is at least as close, and the layers in between
    lw = r["layerwise"]
    assert lw["per_module"]["residual_norm"] <= lw["per_layer"]["residual_norm"] * (1 + 1e-12)
    assert lw["per_layer"]["residual_norm"] <= resid * (1 + 1e-12)
    assert set(lw["layers"]) == {"0", "1"}
    Xm, tm = X[: 24 * 16], t[: 24 * 16]  # the first module alone
    refm = scipy_optimize.minimize(lambda w: np.sum((Xm @ w - tm) ** 2), np.full(3, 1 / 3), method="SLSQP",
                                   bounds=[(0, None)] * 3,
                                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                                   options={"ftol": 1e-15})
    np.testing.assert_allclose(lw["modules"][m0]["weights"], refm.x, atol=1e-5)
    # the results are plain JSON
    json.dumps(r, allow_nan=False)


def test_optimize_constraint_variants_and_checkpoint_subset(synthetic):
    cfg, deltas = synthetic
    X, t = dense_problem(deltas, ["single", "annot"], "concat")
    r = combine.optimize(cfg, "concat", constraint="unconstrained", checkpoints=["single", "annot", "concat"])
    assert r["checkpoint_names"] == ["single", "annot"]
    np.testing.assert_allclose(r["global_weights"], np.linalg.lstsq(X, t, rcond=None)[0], rtol=1e-8)
    r = combine.optimize(cfg, "concat", constraint="nonnegative", checkpoints=["single", "annot"])
    np.testing.assert_allclose(r["global_weights"], scipy_optimize.nnls(X, t)[0], atol=1e-8)


def test_optimize_recovers_weights_of_a_cat_built_target(synthetic, tmp_path):
    cfg, _ = synthetic
    w = {"single": 0.2, "multi": 0.5, "annot": 0.3}
    combine.build(cfg, w, tmp_path / "mix", mode="cat")
    r = combine.optimize({**cfg, "mix": str(tmp_path / "mix")}, "mix", checkpoints=list(w))
    np.testing.assert_allclose(r["global_weights"], list(w.values()), atol=1e-9)
    assert r["evaluation"]["relative_error"] < 1e-9 and r["evaluation"]["r_squared"] > 1 - 1e-12


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def _peft_adapters(model_dir, arch, tmp_path, specs):
    """Saves one PEFT adapter per spec (real PEFT, random non-zero factors); returns paths and dense deltas."""
    paths, deltas = {}, {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(load(model_dir), peft.LoraConfig(target_modules=TARGETS[arch],
                                                                     init_lora_weights=False, **spec))
        model.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
        deltas[name] = {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach().double()
                        for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    return paths, deltas


SPECS = {
    "a": dict(r=2, lora_alpha=4),
    "b": dict(r=4, lora_alpha=6, use_rslora=True),
    "c": dict(r=3, lora_alpha=8, rank_pattern={"v_proj": 2, "c_proj": 5}, alpha_pattern={"down_proj": 3}),
    "t": dict(r=4, lora_alpha=8),
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gram_and_scales_agree_with_peft_deltas(model_dirs, tmp_path, arch):
    # different ranks, alphas, rsLoRA, rank/alpha patterns, and GPT-2's fan_in_fan_out: PEFT's own deltas decide
    paths, deltas = _peft_adapters(model_dirs[arch], arch, tmp_path, SPECS)
    r = combine.optimize(paths, "t")
    modules = list(deltas["t"])
    X = np.stack([np.concatenate([deltas[n][m].flatten().numpy() for m in modules]) for n in "abc"], 1)
    t = np.concatenate([deltas["t"][m].flatten().numpy() for m in modules])
    np.testing.assert_allclose(np.array(r["gram"]["G"]), X.T @ X, rtol=1e-6)
    np.testing.assert_allclose(np.array(r["gram"]["b"]), X.T @ t, rtol=1e-6, atol=1e-6 * np.abs(X.T @ t).max())
    assert r["num_modules"] == len(modules)


# --- build -------------------------------------------------------------------------------------------------
def _peft_delta(model_dir, adapter_dir):
    model = peft.PeftModel.from_pretrained(load(model_dir), adapter_dir)
    return model, {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach().double()
                   for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cat_build_is_the_exact_weighted_sum_and_loads_in_peft(model_dirs, tmp_path, input_ids, arch):
    paths, deltas = _peft_adapters(model_dirs[arch], arch, tmp_path, SPECS)
    w = {"a": 0.25, "b": -0.5, "c": 1.25}
    (tmp_path / "t" / "tokenizer.json").write_text("{}")
    (tmp_path / "t" / "sub").mkdir()
    (tmp_path / "t" / "sub" / "trainer_state.json").write_text("{}")
    out = combine.build(paths, w, tmp_path / "out", mode="cat", template=tmp_path / "t")
    assert out["relative_deviation"] < 1e-6
    model, built = _peft_delta(model_dirs[arch], tmp_path / "out")
    for m in deltas["a"]:
        exact = sum(wi * deltas[n][m] for n, wi in w.items())
        torch.testing.assert_close(built[m], exact, rtol=1e-5, atol=1e-6)
    # logits: PEFT with the built adapter = base weights plus the exact sum, merged by hand in float64
    base = load(model_dirs[arch])
    with torch.no_grad():
        for name, mod in base.named_modules():
            if name in deltas["a"]:
                d = sum(wi * deltas[n][name] for n, wi in w.items())
                mod.weight += d.to(mod.weight.dtype)  # PEFT's delta is in the layer's own orientation
    torch.testing.assert_close(logits(model.eval(), input_ids), logits(base, input_ids), rtol=1e-4, atol=1e-4)
    # lispetorch loads it too, with the same logits
    ours = load(model_dirs[arch])
    lt.load_adapter(ours, tmp_path / "out")
    torch.testing.assert_close(logits(ours, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"COMBINATION_README.md", "tokenizer.json", "sub", "adapter_config.json",
            "adapter_model.safetensors"} <= set(names)
    readme = (tmp_path / "out" / "COMBINATION_README.md").read_text()
    assert "0.250000" in readme and "-0.500000" in readme and "exact" in readme


@pytest.mark.parametrize("rank", [2, 5])
def test_svd_build_is_the_truncated_svd_of_the_dense_sum(model_dirs, tmp_path, rank):
    paths, deltas = _peft_adapters(model_dirs["llama"], "llama", tmp_path, SPECS)
    w = {"a": 0.3, "b": 0.3, "c": 0.4}
    out = combine.build(paths, w, tmp_path / "out", mode="svd", rank=rank)
    _, built = _peft_delta(model_dirs["llama"], tmp_path / "out")
    disc, total = 0.0, 0.0
    for m in deltas["a"]:
        exact = sum(wi * deltas[n][m] for n, wi in w.items())
        U, S, Vh = torch.linalg.svd(exact)
        torch.testing.assert_close(built[m], U[:, :rank] * S[:rank] @ Vh[:rank], rtol=1e-5, atol=1e-6)
        disc += float(S[rank:].square().sum())
        total += float(S.square().sum())
    np.testing.assert_allclose(out["relative_deviation"], math.sqrt(disc / total), rtol=1e-4)
    assert "Eckart" in (tmp_path / "out" / "COMBINATION_README.md").read_text()


def test_svd_build_matches_peft_add_weighted_adapter(model_dirs, tmp_path):
    specs = {"a": dict(r=4, lora_alpha=8), "b": dict(r=4, lora_alpha=16), "c": dict(r=4, lora_alpha=4)}
    paths, _ = _peft_adapters(model_dirs["llama"], "llama", tmp_path, specs)
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    combine.build(paths, w, tmp_path / "ours", mode="svd", rank=4)
    _, ours = _peft_delta(model_dirs["llama"], tmp_path / "ours")
    model = peft.PeftModel.from_pretrained(load(model_dirs["llama"]), paths["a"], adapter_name="a")
    for n in "bc":
        model.load_adapter(paths[n], adapter_name=n)
    model.add_weighted_adapter(list(w), list(w.values()), "svd", combination_type="svd", svd_rank=4)
    for name, mod in model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            key = name.removeprefix("base_model.model.")
            torch.testing.assert_close(ours[key].float(), mod.get_delta_weight("svd"), rtol=1e-4, atol=1e-5)


def test_linear_build_is_the_seed_method_and_says_it_approximates(tmp_path):
    shapes = dict(list(SHAPES.items())[:2])
    fa, fb = random_factors(shapes, 3, seed=1), random_factors(shapes, 3, seed=2)
    write_checkpoint(tmp_path / "a", fa, alpha=6)
    write_checkpoint(tmp_path / "b", fb, alpha=3)
    cfg = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    w = {"a": 0.4, "b": 0.6}
    out = combine.build(cfg, w, tmp_path / "lin", mode="linear")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "lin" / "adapter_model.safetensors"))
    conf = json.loads((tmp_path / "lin" / "adapter_config.json").read_text())
    assert conf["r"] == 3 and conf["lora_alpha"] == 6  # scaling 2, the first checkpoint's
    exact_total, dev_total = 0.0, 0.0
    for m in shapes:
        A = 0.4 * fa[m][0] + 0.6 * fb[m][0]
        B = 0.4 * fa[m][1] + 0.6 * (1.0 / 2.0) * fb[m][1]  # s_b / s_out = 1 / 2
        torch.testing.assert_close(t[f"{PREFIX}{m}.lora_A.weight"], A)
        torch.testing.assert_close(t[f"{PREFIX}{m}.lora_B.weight"], B)
        exact = 0.4 * 2 * fa[m][1] @ fa[m][0] + 0.6 * 1 * fb[m][1] @ fb[m][0]
        dev_total += float(torch.linalg.matrix_norm(2 * B @ A - exact) ** 2)
        exact_total += float(torch.linalg.matrix_norm(exact) ** 2)
    np.testing.assert_allclose(out["relative_deviation"], math.sqrt(dev_total / exact_total), rtol=1e-9)
    assert out["relative_deviation"] > 0.1  # the cross terms are real
    assert "approximation" in (tmp_path / "lin" / "COMBINATION_README.md").read_text()
    write_checkpoint(tmp_path / "c", random_factors(shapes, 2, seed=3))
    with pytest.raises(ValueError, match=r"mode 'linear' needs equal ranks.*model.layers.0.self_attn.q_proj"):
        combine.build({**cfg, "c": str(tmp_path / "c")}, {"a": 0.5, "c": 0.5}, tmp_path / "lin2", mode="linear")
    assert not (tmp_path / "lin2").exists()


def test_build_accepts_an_optimize_result_and_drops_zero_weights(synthetic, tmp_path):
    cfg, deltas = synthetic
    r = {"checkpoint_names": ["single", "multi", "annot"], "global_weights": [0.0, 0.4, 0.6]}
    out = combine.build(cfg, r, tmp_path / "o")
    assert out["weights"] == {"multi": 0.4, "annot": 0.6}
    conf = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert conf["r"] == 7 and conf["lora_alpha"] == 7 and not conf["use_rslora"]


# --- failures leave nothing ---------------------------------------------------------------------------------
def test_failed_build_leaves_nothing_and_keeps_the_previous_output(synthetic, tmp_path):
    cfg, _ = synthetic
    bad = random_factors(SHAPES, 2, seed=9)
    last = list(SHAPES)[-1]
    bad[last][1][3, 1] = float("nan")  # only the last module: the build fails late
    write_checkpoint(tmp_path / "bad", bad, alpha=4)
    cfg2 = {**cfg, "bad": str(tmp_path / "bad")}
    before = set(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=rf"checkpoint 'bad'.*{last}\.lora_B\.weight holds 1 NaN"):
        combine.build(cfg2, {"single": 0.5, "bad": 0.5}, tmp_path / "out")
    assert set(os.listdir(tmp_path)) == before  # no output, no temporary directory
    combine.build(cfg, {"single": 1.0}, tmp_path / "out")
    first = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        combine.build(cfg, {"multi": 1.0}, tmp_path / "out")
    with pytest.raises(ValueError, match="NaN"):
        combine.build(cfg2, {"bad": 1.0}, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == first
    assert set(os.listdir(tmp_path)) == before | {"out"}
    combine.build(cfg, {"multi": 1.0}, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() != first
    with pytest.raises(ValueError, match="refusing to overwrite an input"):
        combine.build(cfg, {"multi": 1.0}, cfg["single"], overwrite=True)


# --- bad input ---------------------------------------------------------------------------------------------
def test_yaml_that_does_not_parse_is_named_with_its_line(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("checkpoints:\n  a:\n    path: x\n   bad: [unclosed\n")
    with pytest.raises(ValueError, match=r"c\.yml: not valid YAML at line 4"):
        combine.optimize(p, "a")
    p.write_text("checkpoints: [1, 2]\n")
    with pytest.raises(ValueError, match="'checkpoints' must be a non-empty mapping"):
        combine.load_config(p)
    p.write_text("checkpoints:\n  a: {description: no path}\n")
    with pytest.raises(ValueError, match="checkpoint 'a' needs a 'path'"):
        combine.load_config(p)
    p.write_text("checkpoints:\n  a: {path: x}\nsettings: {verify_paths: maybe}\n")
    with pytest.raises(ValueError, match="settings.verify_paths must be true or false"):
        combine.load_config(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        combine.load_config(tmp_path / "missing.yml")


def test_paths_are_verified_and_explained(synthetic, tmp_path, capsys):
    cfg, _ = synthetic
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    p = tmp_path / "c.yml"
    p.write_text("checkpoints:\n"
                 f"  single: {{path: {cfg['single']}}}\n"
                 "  gone: {path: does/not/exist}\n"
                 "  noweights: {path: noweights}\n"
                 "  empty: {path: empty}\n"
                 "  concat: {path: concat}\n"
                 "settings: {verify_paths: true, verbose_paths: true}\n")
    with pytest.raises(FileNotFoundError) as e:
        combine.optimize(p, "concat")
    msg = str(e.value)
    assert f"gone: {tmp_path / 'does/not/exist'} does not exist" in msg
    assert "noweights: " in msg and "lacks adapter_model.safetensors" in msg
    assert "empty: " in msg and "lacks adapter_config.json and adapter_model.safetensors" in msg
    assert "single" not in msg.split("\n", 1)[1]
    out = capsys.readouterr().out
    assert "ok  single" in out and "BAD gone" in out  # verbose: what was checked
    # relative paths are relative to the list: 'concat' resolves next to c.yml
    assert "concat" not in msg


def test_target_not_in_config_and_unknown_names(synthetic):
    cfg, _ = synthetic
    with pytest.raises(ValueError, match=r"target 'nope' is not in <mapping> \(it lists single, multi, annot"):
        combine.optimize(cfg, "nope")
    with pytest.raises(ValueError, match=r"checkpoint\(s\) 'zzz' are not in"):
        combine.optimize(cfg, "concat", checkpoints=["single", "zzz"])
    with pytest.raises(ValueError, match="no checkpoint to combine"):
        combine.optimize(cfg, "concat", checkpoints=["concat"])
    with pytest.raises(ValueError, match=r"checkpoint\(s\) 'zzz' are not in"):
        combine.build(cfg, {"zzz": 1.0}, "unused")
    with pytest.raises(ValueError, match="the weight of checkpoint 'single' must be a finite number"):
        combine.build(cfg, {"single": float("nan")}, "unused")
    with pytest.raises(ValueError, match="every weight is 0"):
        combine.build(cfg, {"single": 0.0}, "unused")
    with pytest.raises(ValueError, match="mode must be one of"):
        combine.build(cfg, {"single": 1.0}, "unused", mode="ties")
    with pytest.raises(ValueError, match="rank applies to mode 'svd' only"):
        combine.build(cfg, {"single": 1.0}, "unused", rank=3)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        combine.build(cfg, {"single": 1.0}, "unused", mode="svd", rank=0)


def test_different_module_sets_error_or_intersect_with_a_warning(synthetic, tmp_path):
    cfg, deltas = synthetic
    fewer = random_factors(dict(list(SHAPES.items())[:3]), 2, seed=4)
    write_checkpoint(tmp_path / "fewer", fewer, alpha=4)
    cfg2 = {**cfg, "fewer": str(tmp_path / "fewer")}
    with pytest.raises(ValueError, match=r"different module sets: fewer lacks model\.layers\.1\.self_attn\.v_proj"):
        combine.optimize(cfg2, "concat")
    with pytest.warns(UserWarning, match=r"combining only the 3 modules.*dropped 1.*v_proj"):
        r = combine.optimize(cfg2, "concat", on_mismatch="intersect")
    assert r["num_modules"] == 3 and r["dropped_modules"] == ["model.layers.1.self_attn.v_proj"]
    with pytest.warns(UserWarning, match="combining only the 3 modules"):
        combine.build(cfg2, {"single": 0.5, "fewer": 0.5}, tmp_path / "o", on_mismatch="intersect")
    conf = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert conf["target_modules"].startswith("^(") and "v_proj" in conf["target_modules"]
    from safetensors.torch import load_file

    assert len(load_file(str(tmp_path / "o" / "adapter_model.safetensors"))) == 6
    # and a module whose shape differs between checkpoints
    other = random_factors({**SHAPES, "model.layers.1.self_attn.v_proj": (9, 16)}, 2, seed=5)
    write_checkpoint(tmp_path / "other", other)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.1\.self_attn\.v_proj' has different shapes"):
        combine.optimize({**cfg, "other": str(tmp_path / "other")}, "concat")


def test_nan_in_a_checkpoint_is_named(synthetic, tmp_path):
    cfg, _ = synthetic
    f = random_factors(SHAPES, 2, seed=6)
    f["model.layers.1.self_attn.q_proj"][0][1, 2] = float("inf")
    write_checkpoint(tmp_path / "nan", f)
    with pytest.raises(ValueError, match=r"checkpoint 'nan'.*model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight "
                                         r"holds 1 NaN/Inf"):
        combine.optimize({**cfg, "nan": str(tmp_path / "nan")}, "concat")


def test_malformed_checkpoints_are_named(synthetic, tmp_path):
    cfg, _ = synthetic
    f = random_factors(SHAPES, 2, seed=7)
    from safetensors.torch import save_file

    d = write_checkpoint(tmp_path / "half", f)
    save_file({f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(lt.AdapterFormatError, match="has no lora_B for module 'model.layers.0.self_attn.q_proj'"):
        combine.optimize({**cfg, "half": str(d)}, "concat")
    d = write_checkpoint(tmp_path / "rank", f, r=5)
    with pytest.raises(lt.AdapterFormatError, match="has rank 2 but .*adapter_config.json says 5"):
        combine.optimize({**cfg, "rank": str(d)}, "concat")
    d = write_checkpoint(tmp_path / "trunc", f)
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(lt.AdapterFormatError, match="not a readable safetensors file"):
        combine.optimize({**cfg, "trunc": str(d)}, "concat")
    d = write_checkpoint(tmp_path / "fan", f, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="disagree on fan_in_fan_out"):
        combine.optimize({**cfg, "fan": str(d)}, "concat")


def test_mapped_factors_are_views_of_the_file_and_writes_do_not_reach_it(synthetic, tmp_path):
    from lispetorch.combine.reader import MappedFile, file_order, open_checkpoint, stream

    cfg, _ = synthetic
    c = open_checkpoint("multi", cfg["multi"])
    before = c.weights_file.read_bytes()
    f = MappedFile(c.weights_file, c.entries, c.file_size)
    from safetensors.torch import load_file

    ref = load_file(str(c.weights_file))
    for key, t in ref.items():
        v = f.tensor(key)
        assert torch.equal(v, t) and v.dtype == t.dtype
        assert f._address <= v.data_ptr() < f._address + c.file_size  # a view of the map, not a copy
    v = f.tensor(next(iter(ref)))
    v.mul_(0.0).add_(7.0)  # copy-on-write: this process's pages only
    assert c.weights_file.read_bytes() == before
    # streaming in file order gives every module's factors, whatever order is asked for
    mods = list(c.modules)
    order = file_order([c], mods)
    assert sorted(order) == sorted(mods)
    begins = [c.entries[c.modules[m].key_A].begin for m in order]
    assert begins == sorted(begins)
    with stream([c], order) as it:
        seen = {m: (A, B) for m, (A,), (B,) in it}
    for m in mods:
        assert torch.equal(seen[m][0], ref[c.modules[m].key_A]) and torch.equal(seen[m][1], ref[c.modules[m].key_B])


def test_mapped_file_reads_a_misaligned_tensor_and_rejects_a_bad_header(tmp_path):
    from lispetorch.combine.reader import MappedFile

    # a hand-written file whose float32 tensor starts 2 bytes into the data: read by copying, same values
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = json.dumps({"pad": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                         "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [2, 26]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0" + x.numpy().tobytes())
    f = MappedFile(path)
    assert torch.equal(f.tensor("x"), x)
    with pytest.raises(lt.AdapterFormatError, match="pad has dtype U8"):
        f.tensor("pad")
    bad = json.dumps({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 400]}}).encode()
    path.write_bytes(len(bad).to_bytes(8, "little") + bad + x.numpy().tobytes())
    with pytest.raises(lt.AdapterFormatError, match=r"odd.safetensors is not a readable safetensors file \(x: "):
        MappedFile(path)
    path.write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(lt.AdapterFormatError, match="header length 1000000000 does not fit"):
        MappedFile(path)
    path.write_bytes(b"\x02\x00")
    with pytest.raises(lt.AdapterFormatError, match="not a readable safetensors file"):
        MappedFile(path)


# --- the steps and the command line -------------------------------------------------------------------------
def test_extract_and_organize(model_dirs, tmp_path):
    paths, deltas = _peft_adapters(model_dirs["gpt2"], "gpt2", tmp_path, {"a": SPECS["a"], "c": SPECS["c"]})
    meta = combine.extract(paths, tmp_path / "ex", delta=True)
    from safetensors.torch import load_file

    for n in "ac":
        assert meta[n]["delta_orientation"] == "in_out"  # GPT-2 Conv1D
        D = load_file(str(tmp_path / "ex" / f"{n}_AB_products.safetensors"))
        A = load_file(str(tmp_path / "ex" / f"{n}_A_matrices.safetensors"))
        for m, d in deltas[n].items():
            torch.testing.assert_close(D[m].double(), d, rtol=1e-5, atol=1e-6)  # Conv1D's (in, out), as PEFT's
            assert A[m].shape == (meta[n]["modules"][m]["rank"], d.shape[0])
        assert (tmp_path / "ex" / f"{n}_metadata.json").is_file()
    assert (tmp_path / "ex" / "EXTRACTION_SUMMARY.md").is_file()
    assert (tmp_path / "ex" / "checkpoints_config.yml").is_file()
    index = combine.organize(tmp_path / "ex")
    org = tmp_path / "ex" / "organized_by_layer_module"
    saved = json.loads((org / "master_index.json").read_text())
    assert saved == index and index["num_combinations"] == len(deltas["a"])
    first = index["modules"]["transformer.h.0.attn.c_attn"]
    assert first["index"] == 0 and first["file"] == "index_000_layer_00_c_attn_matrices.safetensors"
    t = load_file(str(org / first["file"]))
    assert set(t) == {f"{n}.{k}" for n in "ac" for k in ("lora_A", "lora_B", "delta")}
    with pytest.raises(FileNotFoundError, match="holds no \\*_metadata.json"):
        combine.organize(tmp_path / "a")


def test_cli_runs_every_step(synthetic, tmp_path, capsys):
    cfg, _ = synthetic
    yml = tmp_path / "c.yml"
    assert cli_main(["combine", "init-config", "--config", str(yml)]) == 0
    assert "concatenationTrained" in yml.read_text()
    assert combine.load_config(yml).names == ["annotated", "multiline", "singleline", "concatenationTrained"]
    assert cli_main(["combine", "init-config", "--config", str(yml)]) == 2
    assert "exists" in capsys.readouterr().err
    args = [f"{n}={p}" for n, p in cfg.items()]
    assert cli_main(["combine", "init-config", "--config", str(yml), "--force", "--checkpoint", *args]) == 0
    res = tmp_path / "r.json"
    assert cli_main(["combine", "optimize", "--config", str(yml), "--target", "concat", "--output", str(res),
                     "--layerwise"]) == 0
    r = json.loads(res.read_text())
    assert r["checkpoint_names"] == ["single", "multi", "annot"] and "layerwise" in r
    np.testing.assert_allclose(r["global_weights"], combine.optimize(cfg, "concat")["global_weights"], rtol=1e-12)
    assert cli_main(["combine", "build", "--config", str(yml), "--results", str(res), "--output",
                     str(tmp_path / "svd"), "--mode", "svd", "--rank", "3"]) == 0
    assert json.loads((tmp_path / "svd" / "adapter_config.json").read_text())["r"] == 3
    assert cli_main(["combine", "build", "--config", str(yml), "--weights", "single=0.5", "multi=0.5",
                     "--output", str(tmp_path / "cat")]) == 0
    assert cli_main(["combine", "extract", "--config", str(yml), "--output-dir", str(tmp_path / "ex"),
                     "--checkpoints", "single"]) == 0
    assert sorted(p.name for p in (tmp_path / "ex").glob("*.safetensors")) == \
        ["single_A_matrices.safetensors", "single_B_matrices.safetensors"]
    assert cli_main(["combine", "organize", "--input-dir", str(tmp_path / "ex")]) == 0
    assert cli_main(["combine", "all", "--config", str(yml), "--target", "concat", "--work-dir",
                     str(tmp_path / "work"), "--output", str(tmp_path / "all"), "--mode", "linear"]) == 2
    assert "needs equal ranks" in capsys.readouterr().err  # the sources have ranks 2, 3, 4
    assert not (tmp_path / "all").exists()
    assert cli_main(["combine", "all", "--config", str(yml), "--target", "concat", "--work-dir",
                     str(tmp_path / "work"), "--output", str(tmp_path / "all")]) == 0
    assert (tmp_path / "work" / "combination_results.json").is_file()
    assert (tmp_path / "work" / "extracted" / "organized_by_layer_module" / "master_index.json").is_file()
    assert (tmp_path / "all" / "COMBINATION_README.md").is_file()
    capsys.readouterr()
    assert cli_main(["combine", "optimize", "--config", str(yml), "--target", "missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lispetorch combine: error: target 'missing' is not in") and "Traceback" not in err
    yml.write_text("checkpoints:\n  a: [\n")
    assert cli_main(["combine", "optimize", "--config", str(yml), "--target", "a"]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
