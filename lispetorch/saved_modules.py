"""Whole modules trained beside the adapters (PEFT's ``modules_to_save``): the original, frozen, and one trainable
copy per adapter, in PEFT's layout (``<name>.original_module``, ``<name>.modules_to_save.<adapter>``)."""

from __future__ import annotations

import copy

from torch import nn

from .switch import AdapterSwitch


class ModulesToSave(AdapterSwitch, nn.Module):
    """A module trained whole: the original (frozen, what the model computes with adapters off or without a copy
    for the active adapter) and a trainable copy per adapter name.

    Attributes the wrapper itself lacks (``weight``, ``embedding_dim``, …) are read from the module in use, so model
    code that reads its output head's or embedding's attributes keeps working. The module in use is chosen at each
    change of state, not at each forward, so a compiled model switches between adapters' copies without
    recompiling.

    Args:
        original (nn.Module): the module to train whole.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self._view = (original,)  # the module in use, in a tuple so that it is not registered twice
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: str | None = None
        self._enabled = True
        for p in original.parameters():
            p.requires_grad_(False)

    def state_changed(self) -> None:
        """Chooses the module in use: the active adapter's copy when enabled, else the original."""
        self._choose()

    def _choose(self) -> None:
        copies = self.modules_to_save
        use = self._enabled and self._active_adapter in copies
        self._view = (copies[self._active_adapter] if use else self.original_module,)

    def in_use(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, or the original."""
        return self.__dict__["_view"][0]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_view" not in self.__dict__:
                raise
        return getattr(self.in_use(), name)

    def add_copy(self, name: str, state: dict | None = None) -> nn.Module:
        """Adds (or replaces) adapter ``name``'s trainable copy of the original, with the tensors ``state`` when given
        (a state dict of the original's keys and shapes, checked by the caller)."""
        module = copy.deepcopy(self.original_module)
        if state is not None:
            module.load_state_dict(state, strict=True, assign=False)
        self.modules_to_save[name] = module
        self._choose()
        return module

    def set_trainable(self, name: str, trainable: bool) -> None:
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(trainable)

    def delete_copy(self, name: str) -> None:
        del self.modules_to_save[name]
        if self._active_adapter == name:
            self._active_adapter = None
        self._choose()

    def forward(self, *args, **kwargs):
        return self._view[0](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active_adapter!r}"
