"""Explicit streaming state.

Every streaming layer builds its own state with `init_state(batch_size)` and advances it
with `step(x, state)`; `forward(x)` is always the offline computation. Nothing is hidden
in the module, so one set of weights serves any number of independent streams, and a
batch slot is restarted with `state.reset(mask)` without touching its neighbours.
"""

from dataclasses import dataclass, fields
from typing import Protocol

import torch


class StreamingState(Protocol):
    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restart the slots where `mask` ([B] bool) is True; all slots when None."""


def keep_mask(mask: torch.Tensor | None, ndim: int) -> torch.Tensor | bool:
    """1 where a slot keeps its state, 0 where it restarts, shaped to broadcast over dim 0.

    Multiplying by it resets without a device sync (no boolean indexing).
    """
    if mask is None:
        return False
    return (~mask).view(-1, *([1] * (ndim - 1)))


@dataclass
class StateGroup:
    """States of the children of a container, reset together."""

    children: list

    def reset(self, mask: torch.Tensor | None = None) -> None:
        for child in self.children:
            if child is not None:
                child.reset(mask)


class ResettableFields:
    """Mixin for dataclass states: `reset` resets every field that is itself a state."""

    def reset(self, mask: torch.Tensor | None = None) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if hasattr(value, "reset"):
                value.reset(mask)
