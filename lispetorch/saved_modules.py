"""Whole modules trained beside the adapters (PEFT's ``modules_to_save``): the original, frozen, and one trainable
copy per adapter, in PEFT's layout (``<name>.original_module``, ``<name>.modules_to_save.<adapter>``)."""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    """A module trained whole: the original (frozen, what the model computes with adapters off or without a copy
    for the active adapter) and a trainable copy per adapter name.

    Attributes the wrapper itself lacks (``weight``, ``embedding_dim``, …) are read from the module in use, so model
    code that reads its output head's or embedding's attributes keeps working.

    Args:
        original (nn.Module): the module to train whole.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.enabled = True
        for p in original.parameters():
            p.requires_grad_(False)

    def in_use(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, or the original."""
        modules = self.__dict__["_modules"]
        copies = modules["modules_to_save"]
        if self.__dict__.get("enabled", True) and self.__dict__.get("active_adapter") in copies:
            return copies[self.__dict__["active_adapter"]]
        return modules["original_module"]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or "modules_to_save" not in self.__dict__["_modules"]:
                raise
        return getattr(self.in_use(), name)

    def add_copy(self, name: str, state: dict | None = None) -> nn.Module:
        """Adds (or replaces) adapter ``name``'s trainable copy of the original, with the tensors ``state`` when given
        (a state dict of the original's keys and shapes, checked by the caller)."""
        module = copy.deepcopy(self.original_module)
        if state is not None:
            module.load_state_dict(state, strict=True, assign=False)
        self.modules_to_save[name] = module
        return module

    def set_trainable(self, name: str, trainable: bool) -> None:
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(trainable)

    def delete_copy(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        return self.in_use()(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active_adapter!r}"
