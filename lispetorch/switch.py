"""What every module holding adapters has: the active adapter and an on/off switch. Each change of either is passed
to the module's :meth:`AdapterSwitch.state_changed`, where it refreshes what its forward reads (so that the forward
never decides, and a compiled model does not recompile)."""

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
