"""NF4: blockwise 4-bit NormalFloat weights (Dettmers et al., 2023, "QLoRA"), stored as bitsandbytes stores them.

A weight is flattened row-major and cut into blocks of 64 values; each block keeps its absmax in float32 and each
value the 4-bit index of the nearest of NF4's 16 values to ``x / absmax``, two indices per byte with the first
element in the high nibble. Double quantisation stores the absmax values themselves in 8 bits: their mean is
subtracted and the rest quantised blockwise (blocks of 256) with bitsandbytes' signed dynamic 8-bit code.

:class:`NF4Linear` holds such a weight and dequantises it at every forward, so a frozen quantised base (or a
PiSSA residual) trains under any adapter here (:func:`lispetorch.quantize_nf4` swaps it in for the base layers of
a model); :meth:`NF4Linear.lora_linear` is the fused adapter operator over it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import ShapeError
from .hf import weight_out_in

BLOCKSIZE = 64
DOUBLE_BLOCKSIZE = 256


@functools.lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """The signed dynamic 8-bit code, built as bitsandbytes' ``create_dynamic_map(signed=True)`` builds it
    (compared with it by the tests where bitsandbytes is installed): 256 sorted values in [-1, 1].

    For each exponent ``e = 0..6`` the means of ``2^e + 1`` evenly spaced boundaries in [0.1, 1], scaled by
    ``10^(e − 6)``, with both signs; then 0 and 1.
    """
    data: list[float] = []
    for e in range(7):
        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + e)) * means).tolist()
        data += (-(10 ** (-6 + e)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


class NF4Weight(nn.Module):
    """An NF4-quantised tensor: packed codes and (plain or double-quantised) absmax, as buffers.

    Args:
        w (Tensor): the tensor to quantise (any shape, floating point).
        blocksize (int): values per absmax block. Default 64.
        double_quant (bool): quantise the absmax values too (8-bit, blocks of 256). Default False.
    """

    def __init__(self, w: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = False) -> None:
        super().__init__()
        if not w.is_floating_point():
            raise TypeError(f"NF4 quantises floating-point tensors, got {w.dtype}")
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        packed, absmax = ops.nf4_quantize(w.detach(), self.blocksize)
        self.register_buffer("packed", packed)  # (ceil(numel / 2),) uint8
        if double_quant:
            offset = absmax.mean()
            index, absmax2 = ops.blockwise_quantize(absmax - offset, dynamic_map().to(absmax.device), DOUBLE_BLOCKSIZE)
            self.register_buffer("absmax_index", index)  # (blocks,) uint8
            self.register_buffer("absmax2", absmax2)  # (ceil(blocks / 256),) float32
            self.register_buffer("offset", offset.reshape(()))
        else:
            self.register_buffer("absmax", absmax)  # (blocks,) float32

    def absmax_values(self) -> torch.Tensor:
        """The per-block absmax in float32 (dequantised when double-quantised)."""
        if not self.double_quant:
            return self.absmax
        code = dynamic_map().to(self.absmax2.device)
        return ops.blockwise_dequantize(self.absmax_index, self.absmax2, code, DOUBLE_BLOCKSIZE) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, in ``dtype`` (the original dtype when None)."""
        numel = 1
        for d in self.shape:
            numel *= d
        flat = ops.nf4_dequantize(self.packed, self.absmax_values(), numel, self.blocksize, dtype or self.dtype)
        return flat.view(self.shape)

    def nbytes(self) -> int:
        """Bytes held by the quantised representation."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class NF4Linear(nn.Module):
    """A frozen linear layer whose ``(out, in)`` weight is stored in NF4 and dequantised at every forward.

    ``weight`` is a read-only, dequantised ``(out, in)`` tensor, so :class:`~lispetorch.LoraLinear` can wrap this
    layer like an ``nn.Linear``; merging an adapter into it is refused (the weight is not stored densely).

    Args:
        weight (Tensor): ``(out, in)``. bias (Tensor | None): ``(out,)``.
        blocksize (int): default 64. double_quant (bool): default False.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = BLOCKSIZE,
                 double_quant: bool = False) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ShapeError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.qweight = NF4Weight(weight, blocksize, double_quant)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Module, blocksize: int = BLOCKSIZE, double_quant: bool = False) -> NF4Linear:
        """From an ``nn.Linear`` or a GPT-2 ``Conv1D`` (its weight is transposed to ``(out, in)``)."""
        return cls(weight_out_in(layer).detach(), layer.bias, blocksize, double_quant)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weight is dequantised to (the original weight's)."""
        return self.qweight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def lora_linear(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor | None, scale: float,
                    dropout: float, seed: int) -> torch.Tensor:
        """:func:`lispetorch.ops.nf4_lora_linear` over this layer: ``x Wᵀ + b + scale · ((drop(x) Aᵀ) Rᵀ) Bᵀ``
        with W dequantised when needed (forward and backward) rather than kept for backward.

        Args:
            x (Tensor): ``(..., in)`` in :attr:`weight_dtype`. A (Tensor): ``(r, in)``. B (Tensor): ``(out, r)``.
            R (Tensor | None): ``(r, r)``. scale (float), dropout (float), seed (int): as the operator's.

        Returns:
            Tensor: ``(..., out)``.
        """
        q = self.qweight
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ops.nf4_lora_linear(x, q.packed, q.absmax_values(), self.out_features, q.blocksize, bias, A, B, R,
                                   scale, dropout, seed)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, blocksize={self.qweight.blocksize}, "
                f"double_quant={self.qweight.double_quant}")
