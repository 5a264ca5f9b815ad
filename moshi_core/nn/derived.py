"""Modules that keep tensors derived from their parameters (re-laid-out weights, tables)."""

from collections.abc import Callable
from typing import TypeVar

from torch import nn

T = TypeVar("T")


class DerivedWeights(nn.Module):
    """Keeps what `_cached(name, build)` builds from the parameters, made on first use and
    dropped when the parameters move, change dtype or are loaded again (and then rebuilt)."""

    def __init__(self) -> None:
        super().__init__()
        self._derived: dict[str, object] = {}

    def _apply(self, fn, recurse=True):
        self._derived.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def _cached(self, name: str, build: Callable[[], T]) -> T:
        if name not in self._derived:
            self._derived[name] = build()
        return self._derived[name]  # type: ignore[return-value]
