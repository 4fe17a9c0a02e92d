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
def is_bitsandbytes_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (``Linear4bit``: a packed weight with a ``quant_state``)."""
    return isinstance(module, nn.Linear) and getattr(getattr(module, "weight", None), "quant_state", None) is not None


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

    @classmethod
    def from_packed(cls, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                    blocksize: int = BLOCKSIZE) -> NF4Weight:
        """An NF4 tensor from codes already packed in this layout (two a byte, the first element in the high
        nibble, as bitsandbytes packs them) and their float32 per-block absmax, without quantising anything.

        Raises:
            ShapeError: codes or absmax whose sizes do not fit ``shape`` and ``blocksize``.
        """
        numel = 1
        for d in shape:
            numel *= int(d)
        packed, absmax = packed.reshape(-1), absmax.reshape(-1).float()
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2 or \
                absmax.numel() != -(-numel // blocksize):
            raise ShapeError(f"NF4 codes ({packed.dtype}, {packed.numel()}) and absmax ({absmax.numel()}) do not "
                             f"fit shape {tuple(shape)} in blocks of {blocksize}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.shape, self.dtype = tuple(int(d) for d in shape), dtype
        self.blocksize, self.double_quant = int(blocksize), False
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("absmax", absmax.contiguous())
        return self

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

    @classmethod
    def from_bitsandbytes(cls, layer: nn.Module, dtype: torch.dtype | None = None) -> NF4Linear:
        """From a bitsandbytes ``Linear4bit`` holding NF4 (as transformers loads a model with
        ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``): the same codes, the same per-block
        absmax (dequantised from bitsandbytes' nested 8-bit form when double-quantised), so the weight is the
        very one bitsandbytes dequantises; nothing is requantised. ``dtype``: the dtype the weight is dequantised
        to and computed in (the model's activations'); default the one bitsandbytes records.

        Raises:
            TypeError: not a 4-bit bitsandbytes layer, or one holding FP4 rather than NF4.
        """
        qs = getattr(getattr(layer, "weight", None), "quant_state", None)
        if qs is None:
            raise TypeError(f"{type(layer).__name__} is not a 4-bit bitsandbytes layer (its weight has no quant_state)")
        if qs.quant_type != "nf4":
            raise TypeError(f"the bitsandbytes layer holds {qs.quant_type!r}, not 'nf4'; only NF4 is read")
        absmax = qs.absmax
        if qs.nested:
            from bitsandbytes.functional import dequantize_blockwise

            absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = (int(d) for d in qs.shape)
        self.qweight = NF4Weight.from_packed(layer.weight.data, absmax, tuple(qs.shape), dtype or qs.dtype,
                                             qs.blocksize)
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return self

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
