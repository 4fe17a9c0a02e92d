"""Optimizer parameter groups for the adapters: LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation
of Large Models"), where B learns ``loraplus_lr_ratio`` times faster than A."""

from __future__ import annotations

from torch import nn

from .adapters import adapter_layers
from .config import non_negative_number, positive_number


def optimizer_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 1.0, weight_decay: float = 0.0,
                           embedding_lr: float | None = None) -> list[dict]:
    """The trainable parameters of ``model`` in optimizer parameter groups, for ``torch.optim.AdamW(groups)``.

    Groups, each left out when empty, the first always at ``lr``:

    - the adapters' ``A`` factors and r×r cores (``R``, or the parameters computing it): ``lr``, ``weight_decay``;
    - their ``B`` factors and DoRA magnitudes: ``lr · loraplus_lr_ratio`` (LoRA+; 1 is plain LoRA),
      ``weight_decay``;
    - other trainable matrices (a trained copy of an output head or classifier, ``modules_to_save``): ``lr``,
      ``weight_decay``;
    - other trainable embeddings: ``embedding_lr`` (``lr`` when None), no weight decay;
    - other trainable vectors (biases, norms): ``lr``, no weight decay.

    PEFT's ``create_loraplus_optimizer`` gives A and B the same learning rates and weight decay (it puts biases
    with B and gives LoRA on embedding layers ``loraplus_lr_embedding``).

    Args:
        model (nn.Module): a model whose trainable parameters are the ones to optimise (after
            :func:`~lispetorch.inject` or :func:`~lispetorch.load_adapter`).
        lr (float): the learning rate of A (and of the rest). loraplus_lr_ratio (float): η_B / η_A; the LoRA+
            paper recommends 2 to 16 or more. Default 1.0. weight_decay (float): Default 0.0.
        embedding_lr (float | None): learning rate of trained embedding copies. Default None (``lr``).

    Returns:
        list[dict]: ``{"params", "lr", "weight_decay"}`` groups.

    Raises:
        ConfigError: a learning rate or ratio ≤ 0, or a negative weight decay (named with the value).
    """
    positive_number(lr, "lr")
    positive_number(loraplus_lr_ratio, "loraplus_lr_ratio")
    non_negative_number(weight_decay, "weight_decay")
    if embedding_lr is not None:
        positive_number(embedding_lr, "embedding_lr")
    b_ids: set[int] = set()
    factor_ids: set[int] = set()
    for layer in adapter_layers(model).values():
        for name in layer.lora_A:
            for which, params in layer.adapter_parameters(name).items():
                for p in params:
                    factor_ids.add(id(p))
                    if which in ("B", "M"):  # a DoRA magnitude (1-D) learns at B's rate, as in PEFT
                        b_ids.add(id(p))
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"A": [], "B": [], "matrix": [], "embedding": [], "vector": []}
    for p in model.parameters():  # each shared parameter once
        if not p.requires_grad:
            continue
        if id(p) in factor_ids:
            groups["B" if id(p) in b_ids else "A"].append(p)
        elif id(p) in embedding_ids:
            groups["embedding"].append(p)
        else:
            groups["matrix" if p.dim() >= 2 else "vector"].append(p)
    settings = {
        "A": (lr, weight_decay),
        "B": (lr * loraplus_lr_ratio, weight_decay),
        "matrix": (lr, weight_decay),
        "embedding": (lr if embedding_lr is None else embedding_lr, 0.0),
        "vector": (lr, 0.0),
    }
    out = [{"params": params, "lr": settings[k][0], "weight_decay": settings[k][1]} for k, params in groups.items()
           if params]
    out.sort(key=lambda g: g["lr"] != lr)  # the first group at lr: a schedule reads its base from it
    return out
