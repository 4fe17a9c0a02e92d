"""What every module holding adapters has: the active adapter and an on/off switch. Each change of either is passed
to the module's :meth:`AdapterSwitch.state_changed`, where it refreshes what its forward reads (so that the forward
never decides, and a compiled model does not recompile). And what a module wrapping another (its ``base_layer``)
answers for it: :class:`WrapsBaseLayer`."""

from __future__ import annotations


class AdapterSwitch:
    """The ``active_adapter`` and ``enabled`` properties of an adapter layer (a mixin beside ``nn.Module``)."""

    _active_adapter: str | None = None
    _enabled: bool = True

    @property
    def active_adapter(self) -> str | None:
        """The adapter the forward applies (None: the wrapped module alone)."""
        return self._active_adapter

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self._active_adapter = name
        self.state_changed()

    @property
    def enabled(self) -> bool:
        """False: the forward is the wrapped module's own, whatever the active adapter."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.state_changed()

    def state_changed(self) -> None:
        """Called after every change of :attr:`active_adapter` or :attr:`enabled`."""


class WrapsBaseLayer:
    """A mixin beside ``nn.Module`` for a module that wraps another as ``base_layer``: an attribute it lacks is read
    from the wrapped module, as PEFT's adapter layers do, since model code reads attributes of the layers it built
    (``self.dt_proj.weight @ x``, ``self.c_attn.nf``, ``self.experts.num_experts``)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the wrapper itself
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            try:
                return getattr(self._modules["base_layer"], name)  # anything else the wrapped module has
            except AttributeError:
                raise AttributeError(f"'{type(self).__name__}' object (wrapping "
                                     f"{type(self._modules['base_layer']).__name__}) has no attribute "
                                     f"'{name}'") from None
