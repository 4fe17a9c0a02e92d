"""Typed wrappers of the native operators (``torch.ops.lispetorch``), with their fake implementations.

The operators are defined and differentiated in C++ (``csrc/lispetorch``); this module gives each a Python
signature, a docstring and a ``register_fake`` so that ``torch.compile`` and ``torch.library.opcheck`` can
trace them. Users call these functions, never ``torch.ops.lispetorch`` directly.
"""

from __future__ import annotations

import functools
import importlib
import operator

import torch

# The compiled extension: loading it loads the library that registers the operators.
_C = importlib.import_module(f"{__package__}._C")

_ops = torch.ops.lispetorch


def native_library() -> str:
    """The path of the compiled extension (``lispetorch._C``), beside which its CMake package files are installed."""
    return _C.__file__

__all__ = [
    "lora_linear",
    "lora_linear_grouped",
    "lora_experts_linear",
    "dora_linear",
    "dora_norm",
    "dora_merge_",
    "dora_unmerge_",
    "dropout",
    "dropout_mask",
    "lora_delta",
    "lora_merge_",
    "lora_unmerge_",
    "lora_gram",
    "lora_gram_modules",
    "lora_factored_svd",
    "svd_lowrank",
    "svd_factors",
    "blockwise_quantize",
    "blockwise_dequantize",
    "nf4_quantize",
    "nf4_dequantize",
    "nf4_lora_linear",
    "cpu_isa",
]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None = None,
    scale: float = 1.0,
    dropout: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Fused low-rank linear ``y = x Wᵀ + b + scale · ((drop(x) Aᵀ) Rᵀ) Bᵀ``, differentiable.

    Args:
        x (Tensor): input ``(..., in)``.
        weight (Tensor): frozen base weight ``(out, in)``.
        bias (Tensor | None): base bias ``(out,)``.
        lora_A (Tensor): ``(r, in)``. lora_B (Tensor): ``(out, r)``. lora_R (Tensor | None): ``(r, r)``.
        scale (float): the adapter scaling (``alpha / r`` for LoRA). Default 1.0.
        dropout (float): dropout probability on the adapter's input, in ``[0, 1)``. Default 0.0.
        seed (int): seed of the counter-based dropout mask; backward regenerates the same mask from it.

    Returns:
        Tensor: ``(..., out)``.

    Raises:
        RuntimeError: shapes, dtypes or devices that do not fit, named in the message.
    """
    return _ops.lora_linear(x, weight, bias, lora_A, lora_B, lora_R, float(scale), float(dropout), int(seed))


def lora_linear_grouped(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    group: torch.Tensor,
    scales: list[float],
    dropout: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """One adapter per group of rows, in one call: ``y = x Wᵀ + b + s_g · ((drop(x) A_gᵀ) B_gᵀ)`` on the rows of
    ``x`` (viewed as ``(N, in)``) whose group is ``g``, differentiable; each adapter's gradient comes from its
    own rows only.

    ``x``, ``weight``, ``bias``, ``dropout`` and ``seed`` are as in :func:`lora_linear` (one dropout probability
    for every group).

    Args:
        lora_A (Tensor): ``(G, r, in)``, the adapters' A stacked (a smaller rank padded with zero rows).
        lora_B (Tensor): ``(G, out, r)``.
        group (Tensor): ``(N,)`` int64, the adapter of each row, ``-1`` for the base layer alone.
        scales (list[float]): ``G`` scalings.

    Returns:
        Tensor: ``(..., out)``.
    """
    return _ops.lora_linear_grouped(x, weight, bias, lora_A, lora_B, group, [float(s) for s in scales],
                                    float(dropout), int(seed))


def lora_experts_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """LoRA on a mixture of experts, in one call: ``y = x W_eᵀ + b_e + s · ((drop(x) A_eᵀ) B_eᵀ)`` on the rows
    of ``x`` routed to expert ``e``, differentiable; each expert's adapter meets only its own rows, and no
    per-expert delta is formed.

    Args:
        x (Tensor): ``(S, in)``, the routed rows sorted by expert (a token routed to k experts is k rows).
        weight (Tensor): ``(E, out, in)``, the experts' weights (a stack stored ``(E, in, out)`` passed as its
            transposed view).
        bias (Tensor | None): ``(E, out)``.
        lora_A (Tensor): ``(E, r, in)``, one ``A`` per expert (``r = 0``: the experts alone).
        lora_B (Tensor): ``(E, out, r)``.
        offsets (Tensor): ``(E,)`` int32 or int64, the cumulative end of each expert's rows (the last is ``S``).
        scale (float): the scaling ``s``.
        dropout (float): dropout probability on the adapter's input, in ``[0, 1)``. Default 0.
        seed (int): the dropout mask's seed, as in :func:`lora_linear`. Default 0.

    Returns:
        Tensor: ``(S, out)``.

    Raises:
        RuntimeError: shapes, dtypes or offsets that do not fit, named in the message.
    """
    return _ops.lora_experts_linear(x, weight, bias, lora_A, lora_B, offsets, float(scale), float(dropout),
                                    int(seed))


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None,
    magnitude: torch.Tensor,
    scale: float = 1.0,
    dropout: float = 0.0,
    seed: int = 0,
    keep_output: bool = True,
) -> torch.Tensor:
    """DoRA's weight-decomposed linear (Liu et al., 2024), fused and differentiable:
    ``y = g ⊙ (x Wᵀ + scale · ((drop(x) Aᵀ) Rᵀ) Bᵀ) + b`` with ``g = m / ‖W + scale · B R A‖`` per output row.

    The row norms come from the factors (:func:`dora_norm`), never from the ``(out, in)`` sum, and are a constant
    in backward, as the paper proposes and PEFT does. Dropout applies to the low-rank branch's input, as in
    :func:`lora_linear`; evaluated without dropout the layer is PEFT's DoRA layer.

    The other arguments are as in :func:`lora_linear`.

    Args:
        magnitude (Tensor): ``m`` ``(out,)``.
        keep_output (bool): the magnitude's gradient needs ``z = x Wᵀ + scale · hr Bᵀ``; True: it is read off the
            output, which autograd keeps (the tensor the next layer receives, not a copy); False: nothing is kept
            beyond what :func:`lora_linear` keeps, and backward computes ``x Wᵀ`` again (a product as large as the
            base layer's). The results are the same up to rounding. Default True.

    Returns:
        Tensor: ``(..., out)``.

    Raises:
        RuntimeError: shapes, dtypes or devices that do not fit, named in the message.
    """
    return _ops.dora_linear(x, weight, bias, lora_A, lora_B, lora_R, magnitude, float(scale), float(dropout),
                            int(seed), bool(keep_output))


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_R: torch.Tensor | None = None,
              scale: float = 1.0) -> torch.Tensor:
    """The row norms ``‖W + scale · B R A‖`` ``(out,)``, from ``‖wᵢ‖²``, ``W Aᵀ`` and the Gram ``A Aᵀ``; float32
    (float64 for a float64 weight)."""
    return _ops.dora_norm(weight, lora_A, lora_B, lora_R, float(scale))


def dora_merge_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None,
    magnitude: torch.Tensor,
    scale: float = 1.0,
    safe: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W ← m ⊙ (W + scale · B R A) / ‖W + scale · B R A‖`` in place, returning the state that makes unmerge
    exact: :func:`lora_merge_`'s three tensors and the row norms of the unmerged weight.

    Raises:
        RuntimeError: with ``safe=True``, when the merged weight would hold NaN or Inf (W is left untouched).
    """
    return _ops.dora_merge_(weight, lora_A, lora_B, lora_R, magnitude, float(scale), bool(safe))


def dora_unmerge_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float = 1.0,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The inverse of :func:`dora_merge_` given its norms; bit-exact when also given the rest of its ``state``."""
    distance, index, values = state if state is not None else (None, None, None)
    _ops.dora_unmerge_(weight, lora_A, lora_B, lora_R, magnitude, norm, float(scale), distance, index, values)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout ``x · keep / (1 - p)`` with the counter-based mask of ``seed`` (not differentiable)."""
    return _ops.dropout(x, float(p), int(seed))


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The boolean keep-mask, shaped like ``x``, that :func:`dropout` and :func:`lora_linear` use for ``seed``."""
    return _ops.dropout_mask(x, float(p), int(seed))


def lora_delta(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense delta ``scale · B R A`` ``(out, in)``, computed in ``dtype``."""
    return _ops.lora_delta(lora_A, lora_B, lora_R, float(scale), dtype)


def lora_merge_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None = None,
    scale: float = 1.0,
    safe: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W += scale · B R A`` in place (fp32 accumulation), returning the state that makes unmerge exact.

    Returns:
        tuple: int8 distances ``(out, in)``, exception index ``(K, 2)`` and exception values ``(K,)``; pass them
        to :func:`lora_unmerge_` to get the pre-merge weight back bit for bit.

    Raises:
        RuntimeError: with ``safe=True``, when the merged weight would hold NaN or Inf (W is left untouched).
    """
    return _ops.lora_merge_(weight, lora_A, lora_B, lora_R, float(scale), bool(safe))


def lora_unmerge_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None = None,
    scale: float = 1.0,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``W -= scale · B R A`` in place; exact when given the ``state`` that :func:`lora_merge_` returned."""
    distance, index, values = state if state is not None else (None, None, None)
    _ops.lora_unmerge_(weight, lora_A, lora_B, lora_R, float(scale), distance, index, values)


def lora_gram(
    lora_A: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lora_B: list[torch.Tensor] | tuple[torch.Tensor, ...],
    scales: list[float] | tuple[float, ...] | None = None,
) -> torch.Tensor:
    """The float64 Gram ``G[i, j] = ⟨sᵢ Bᵢ Aᵢ, sⱼ Bⱼ Aⱼ⟩_F`` of k checkpoints of one module, from the factors only.

    Computed as ``sum((Bᵢᵀ Bⱼ) ⊙ (Aᵢ Aⱼᵀ))`` over the stacked factors in one call: cost ``O((in + out)·R²)``
    with ``R = Σ rᵢ``, never the ``(out, in)`` deltas.

    Args:
        lora_A (list[Tensor]): ``Aᵢ`` of shape ``(rᵢ, in)``; ranks may differ.
        lora_B (list[Tensor]): ``Bᵢ`` of shape ``(out, rᵢ)``.
        scales (list[float] | None): ``sᵢ`` (``alpha / r`` for LoRA). Default all 1.

    Returns:
        Tensor: ``(k, k)`` float64, symmetric positive semi-definite.

    Raises:
        RuntimeError: lists of different lengths, or factors whose shapes do not fit (named with their index).
    """
    scales = [1.0] * len(lora_A) if scales is None else [float(s) for s in scales]
    return _ops.lora_gram(list(lora_A), list(lora_B), scales)


def lora_gram_modules(
    lora_A: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lora_B: list[torch.Tensor] | tuple[torch.Tensor, ...],
    scales: list[float] | tuple[float, ...],
    checkpoints: int,
) -> torch.Tensor:
    """:func:`lora_gram` of M modules in one call: entry ``m·k + i`` of each list is checkpoint i of module m.

    One call shares the work of all the modules between threads at once, and costs one call's overhead.

    Args:
        lora_A (list[Tensor]): ``M·k`` factors ``(rₘᵢ, inₘ)``, module-major.
        lora_B (list[Tensor]): ``M·k`` factors ``(outₘ, rₘᵢ)``.
        scales (list[float]): ``M·k`` scalings.
        checkpoints (int): k, the checkpoints per module.

    Returns:
        Tensor: ``(M, k, k)`` float64.

    Raises:
        RuntimeError: list lengths that do not fit, or factors whose shapes do not fit (named with the module and
            the entry).
    """
    return _ops.lora_gram_modules(list(lora_A), list(lora_B), [float(s) for s in scales], int(checkpoints))


def lora_factored_svd(
    lora_A: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lora_B: list[torch.Tensor] | tuple[torch.Tensor, ...],
    scales: list[float] | tuple[float, ...] | None,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``Σᵢ sᵢ Bᵢ Aᵢ`` (Eckart–Young), from QR of the stacked factors, in float64.

    ``B = [s₁B₁ | …] = Q_B R_B`` and ``Aᵀ = [A₁; …]ᵀ = Q_A R_A``; the SVD ``U Σ Vᵀ`` of the small core
    ``R_B R_Aᵀ`` gives the SVD of the sum, ``(Q_B U) Σ (Q_A V)ᵀ``. The ``(out, in)`` sum is never formed.

    Args:
        lora_A (list[Tensor]): ``Aᵢ`` ``(rᵢ, in)``. lora_B (list[Tensor]): ``Bᵢ`` ``(out, rᵢ)``.
        scales (list[float] | None): ``sᵢ`` (combination weight × adapter scaling). Default all 1.
        rank (int): the rank to keep; capped at ``min(Σ rᵢ, out, in)``.

    Returns:
        tuple: ``B (out, q)``, ``A (q, in)`` with ``B A`` the truncated SVD (``√σ`` on each side), and all
        singular values ``S`` ``(min(Σ rᵢ, out, in),)`` of the sum, descending; float64.
    """
    scales = [1.0] * len(lora_A) if scales is None else [float(s) for s in scales]
    return _ops.lora_factored_svd(list(lora_A), list(lora_B), scales, int(rank))


def svd_lowrank(
    weight: torch.Tensor, rank: int, niter: int, oversample: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomised truncated SVD with ``niter`` subspace iterations (Halko, Martinsson & Tropp, 2011).

    Args:
        weight (Tensor): ``(out, in)`` floating point.
        rank (int): triplets to return, in ``[1, min(out, in)]``.
        niter (int): subspace (power) iterations; more is closer to the exact SVD.
        oversample (int): extra columns of the random sketch. Default 10.
        seed (int): seed of the (CPU) generator that draws the sketch. Default 0.

    Returns:
        tuple: ``U (out, rank)``, ``S (rank,)`` descending, ``Vh (rank, in)``; float32 (float64 for float64 input).

    Raises:
        RuntimeError: a rank out of range or a non-float weight, named in the message.
    """
    return _ops.svd_lowrank(weight, int(rank), int(niter), int(oversample), int(seed))


def svd_factors(w: torch.Tensor, r: int, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``r`` singular triplets of ``w`` ``(out, in)`` in float32: ``U (out, r)``, ``S (r,)``, ``Vᵀ (r, in)``.

    A full SVD, or with ``niter`` :func:`svd_lowrank` with that many subspace iterations (Halko et al., 2011).
    """
    W = w.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous()
    return svd_lowrank(W, r, niter)


def blockwise_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``blocksize`` flattened values, the uint8 index of the ``code`` entry nearest ``x / absmax``.

    Returns:
        tuple: indices ``(numel,)`` uint8 and absmax ``(ceil(numel / blocksize),)`` float32.
    """
    return _ops.blockwise_quantize(x, code, int(blocksize))


def blockwise_dequantize(index: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code[index] · absmax[block]``, flattened ``(numel,)``, in ``dtype``."""
    return _ops.blockwise_dequantize(index, absmax, code, int(blocksize), dtype)


def nf4_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 as bitsandbytes stores it: 4-bit codes, two per byte (first element in the high nibble), and a
    float32 absmax per block of ``blocksize`` flattened values.

    Returns:
        tuple: packed ``(ceil(numel / 2),)`` uint8 and absmax ``(ceil(numel / blocksize),)`` float32.
    """
    return _ops.nf4_quantize(x, int(blocksize))


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, numel: int, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``numel`` values of :func:`nf4_quantize`'s output, flattened, in ``dtype``."""
    return _ops.nf4_dequantize(packed, absmax, int(numel), int(blocksize), dtype)


def nf4_lora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    out_features: int,
    blocksize: int,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor | None = None,
    scale: float = 1.0,
    dropout: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """:func:`lora_linear` over an NF4-stored base weight, dequantised in forward and again in backward, never kept.

    What backward keeps is what :func:`lora_linear` keeps over a dense base (the input and the r-wide
    intermediate), not the ``(out, in)`` weight.

    Args:
        x (Tensor): input ``(..., in)``, in the dtype the weight is dequantised to.
        packed (Tensor): the NF4 codes of the ``(out, in)`` weight, row-major, two per byte (:func:`nf4_quantize`).
        absmax (Tensor): the per-block absmax, float32 (dequantised first when double-quantised).
        out_features (int): rows of the weight. blocksize (int): values per absmax block.
        bias (Tensor | None): ``(out,)``. lora_A, lora_B, lora_R, scale, dropout, seed: as :func:`lora_linear`.

    Returns:
        Tensor: ``(..., out)``.
    """
    y, _ = _nf4_lora_linear(x, packed, absmax, int(out_features), int(blocksize), bias, lora_A, lora_B, lora_R,
                            float(scale), float(dropout), int(seed))
    return y


def _nf4_weight(packed, absmax, out_features: int, in_features: int, blocksize: int, dtype) -> torch.Tensor:
    flat = _ops.nf4_dequantize(packed, absmax, out_features * in_features, blocksize, dtype)
    return flat.view(out_features, in_features)  # (out, in)


@torch.library.custom_op("lispetorch::nf4_lora_linear", mutates_args=())
def _nf4_lora_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int, blocksize: int,
                     bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     lora_R: torch.Tensor | None, scale: float, dropout: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    W = _nf4_weight(packed, absmax, out_features, x.shape[-1], blocksize, x.dtype)  # dropped after the forward
    return _ops.lora_linear_forward(x, W, bias, lora_A, lora_B, lora_R, scale, dropout, seed)  # y, hr


@_nf4_lora_linear.register_fake
def _(x, packed, absmax, out_features, blocksize, bias, lora_A, lora_B, lora_R, scale, dropout, seed):
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((_rows(x), lora_A.shape[0]))


def _nf4_setup_context(ctx, inputs, output):
    x, packed, absmax, out_features, blocksize, bias, A, B, R, scale, dropout, seed = inputs
    keep_x = A.requires_grad or (R is not None and R.requires_grad)
    ctx.save_for_backward(x if keep_x else None, A, B, R, output[1])
    # The frozen NF4 storage is held by its layer anyway: referenced, not saved as an activation.
    ctx.storage = (packed, absmax)
    ctx.in_features, ctx.args = x.shape[-1], (out_features, blocksize, scale, dropout, seed)
    ctx.mark_non_differentiable(output[1])


def _nf4_backward(ctx, grad, _grad_hr):
    x, A, B, R, hr = ctx.saved_tensors
    packed, absmax = ctx.storage
    out_features, blocksize, scale, dropout, seed = ctx.args
    need_x, need_A, need_B, need_R = (ctx.needs_input_grad[i] for i in (0, 6, 7, 8))
    mask = [need_x, False, False, need_A, need_B, R is not None and need_R]
    if not any(mask):
        return (None,) * 12
    W = _nf4_weight(packed, absmax, out_features, ctx.in_features, blocksize, grad.dtype)  # again, for dL/dx = g W
    grads = iter(_ops.lora_linear_backward(grad, x, W, A, B, R, hr, scale, dropout, seed, mask))
    gx, _, _, gA, gB, gR = (next(grads) if m else None for m in mask)
    return gx, None, None, None, None, None, gA, gB, gR, None, None, None


_nf4_lora_linear.register_autograd(_nf4_backward, setup_context=_nf4_setup_context)


def _rows(x: torch.Tensor):
    return functools.reduce(operator.mul, x.shape[:-1], 1)


@torch.library.register_fake("lispetorch::lora_linear")
def _(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout, seed):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("lispetorch::lora_linear_forward")
def _(x, weight, bias, lora_A, lora_B, lora_R, scale, dropout, seed):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((_rows(x), lora_A.shape[0]))


def _fake_grads(grad, weight, factors, output_mask, last=None):
    """The gradients a backward kernel returns, as fakes: those of x, weight, bias, then of each factor given
    (None: an absent one), then of ``last`` (a DoRA magnitude, in its own dtype), the wanted ones."""
    shapes = [(*grad.shape[:-1], weight.shape[1]), tuple(weight.shape), (weight.shape[0],),
              *(tuple(f.shape) if f is not None else () for f in factors)]
    dtypes = [grad.dtype] * len(shapes)
    if last is not None:
        shapes.append(tuple(last.shape))
        dtypes.append(last.dtype)
    return [grad.new_empty(s, dtype=d) for s, d, wanted in zip(shapes, dtypes, output_mask, strict=True) if wanted]


@torch.library.register_fake("lispetorch::lora_linear_backward")
def _(grad, x, weight, lora_A, lora_B, lora_R, hr, scale, dropout, seed, output_mask):
    return _fake_grads(grad, weight, (lora_A, lora_B, lora_R), output_mask)


@torch.library.register_fake("lispetorch::lora_linear_grouped")
def _(x, weight, bias, lora_A, lora_B, group, scales, dropout, seed):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("lispetorch::lora_linear_grouped_forward")
def _(x, weight, bias, lora_A, lora_B, group, scales, dropout, seed):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((_rows(x), lora_A.shape[1]))


@torch.library.register_fake("lispetorch::lora_linear_grouped_backward")
def _(grad, x, weight, lora_A, lora_B, group, hr, scales, dropout, seed, output_mask):
    return _fake_grads(grad, weight, (lora_A, lora_B), output_mask)


@torch.library.register_fake("lispetorch::lora_experts_linear")
def _(x, weight, bias, lora_A, lora_B, offsets, scale, dropout, seed):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.register_fake("lispetorch::lora_experts_linear_forward")
def _(x, weight, bias, lora_A, lora_B, offsets, scale, dropout, seed):
    return x.new_empty((x.shape[0], weight.shape[1])), x.new_empty((x.shape[0], lora_A.shape[1]))


@torch.library.register_fake("lispetorch::lora_experts_linear_backward")
def _(grad, x, weight, lora_A, lora_B, offsets, hr, scale, dropout, seed, output_mask):
    shapes = [((grad.shape[0], weight.shape[2]), grad.dtype), (tuple(weight.shape), weight.dtype),
              ((weight.shape[0], weight.shape[1]), grad.dtype), (tuple(lora_A.shape), lora_A.dtype),
              (tuple(lora_B.shape), lora_B.dtype)]
    return [grad.new_empty(s, dtype=d) for (s, d), wanted in zip(shapes, output_mask, strict=True) if wanted]


@torch.library.register_fake("lispetorch::dora_linear")
def _(x, weight, bias, lora_A, lora_B, lora_R, magnitude, scale, dropout, seed, keep_output=True):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _norm_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@torch.library.register_fake("lispetorch::dora_linear_forward")
def _(x, weight, bias, lora_A, lora_B, lora_R, magnitude, scale, dropout, seed):
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((_rows(x), lora_A.shape[0])),
            weight.new_empty((weight.shape[0],), dtype=_norm_dtype(weight)))


@torch.library.register_fake("lispetorch::dora_linear_backward")
def _(grad, x, weight, bias, lora_A, lora_B, lora_R, magnitude, y, hr, norm, scale, dropout, seed, output_mask):
    return _fake_grads(grad, weight, (lora_A, lora_B, lora_R), output_mask, last=magnitude)


@torch.library.register_fake("lispetorch::dora_norm")
def _(weight, lora_A, lora_B, lora_R, scale):
    return weight.new_empty((weight.shape[0],), dtype=_norm_dtype(weight))


@torch.library.register_fake("lispetorch::dora_merge_")
def _(weight, lora_A, lora_B, lora_R, magnitude, scale, safe):
    k = torch.library.get_ctx().new_dynamic_size()
    return (
        weight.new_empty(weight.shape, dtype=torch.int8),
        weight.new_empty((k, 2), dtype=torch.long),
        weight.new_empty((k,)),
        weight.new_empty((weight.shape[0],), dtype=_norm_dtype(weight)),
    )


@torch.library.register_fake("lispetorch::dora_unmerge_")
def _(weight, lora_A, lora_B, lora_R, magnitude, norm, scale, distance, index, values):
    return None


@torch.library.register_fake("lispetorch::dropout")
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("lispetorch::dropout_mask")
def _(x, p, seed):
    return x.new_empty(x.shape, dtype=torch.bool)


@torch.library.register_fake("lispetorch::lora_delta")
def _(lora_A, lora_B, lora_R, scale, dtype):
    return lora_A.new_empty((lora_B.shape[0], lora_A.shape[1]), dtype=dtype)


@torch.library.register_fake("lispetorch::lora_merge_")
def _(weight, lora_A, lora_B, lora_R, scale, safe):
    k = torch.library.get_ctx().new_dynamic_size()
    return (
        weight.new_empty(weight.shape, dtype=torch.int8),
        weight.new_empty((k, 2), dtype=torch.long),
        weight.new_empty((k,)),
    )


@torch.library.register_fake("lispetorch::lora_unmerge_")
def _(weight, lora_A, lora_B, lora_R, scale, distance, index, values):
    return None


@torch.library.register_fake("lispetorch::lora_gram")
def _(lora_A, lora_B, scales):
    return lora_A[0].new_empty((len(lora_A), len(lora_A)), dtype=torch.float64)


@torch.library.register_fake("lispetorch::lora_gram_modules")
def _(lora_A, lora_B, scales, checkpoints):
    return lora_A[0].new_empty((len(lora_A) // checkpoints, checkpoints, checkpoints), dtype=torch.float64)


@torch.library.register_fake("lispetorch::lora_factored_svd")
def _(lora_A, lora_B, scales, rank):
    total = sum(A.shape[0] for A in lora_A)
    out, inp = lora_B[0].shape[0], lora_A[0].shape[1]
    p = min(total, out, inp)
    q = min(rank, p)
    f64 = torch.float64
    return lora_B[0].new_empty((out, q), dtype=f64), lora_A[0].new_empty((q, inp), dtype=f64), \
        lora_A[0].new_empty((p,), dtype=f64)


@torch.library.register_fake("lispetorch::svd_lowrank")
def _(weight, rank, niter, oversample=10, seed=0):
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    out, inp = weight.shape
    return weight.new_empty((out, rank), dtype=dt), weight.new_empty((rank,), dtype=dt), \
        weight.new_empty((rank, inp), dtype=dt)


@torch.library.register_fake("lispetorch::blockwise_quantize")
def _(x, code, blocksize):
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)


@torch.library.register_fake("lispetorch::blockwise_dequantize")
def _(index, absmax, code, blocksize, dtype):
    return index.new_empty((index.numel(),), dtype=dtype)


@torch.library.register_fake("lispetorch::nf4_quantize")
def _(x, blocksize=64):
    n = x.numel()
    return x.new_empty(((n + 1) // 2,), dtype=torch.uint8), \
        x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)


@torch.library.register_fake("lispetorch::nf4_dequantize")
def _(packed, absmax, numel, blocksize, dtype):
    return packed.new_empty((numel,), dtype=dtype)


def cpu_isa() -> str:
    """The vector unit the CPU kernels use: ``"avx512"``, ``"avx2"``, or ``"aten"`` where they leave the work to ATen
    (a processor without AVX2, or ``LISPETORCH_ISA=aten``; ``LISPETORCH_ISA=avx2`` caps it at AVX2). Chosen once
    per process.

    Raises:
        RuntimeError: ``LISPETORCH_ISA`` set to another value.
    """
    return _ops.cpu_isa()
