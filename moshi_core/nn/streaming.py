"""Explicit streaming state.

Every streaming layer builds its own state with `init_state(batch_size)` and advances it
with `step(x, state)`; `forward(x)` is always the offline computation. Nothing is hidden
in the module, so one set of weights serves any number of independent streams, and a
batch slot is restarted with `state.reset(mask)` without touching its neighbours. Some
streams alone are stepped with `rows_of(state, rows)`: a copy of their rows' state, written
back after the step (the conv states are small; KV caches step their rows in place instead).

A lockstep step (one static shape, so one compiled graph or CUDA graph replays every step)
computes every stream and lets only some advance: `active_of(state, active)` keeps the
previous state of the others. It selects with `torch.where` and writes back in place: no
device sync, no shape that depends on the data. Both ways give the same numbers.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Protocol, TypeVar

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


class RowsState(Protocol):
    def take(self, rows: torch.Tensor) -> "RowsState":
        """A copy of the state of streams `rows` [A]."""

    def put(self, rows: torch.Tensor, part: "RowsState") -> None:
        """Write `part` (from `take(rows)`, stepped since) back into streams `rows`."""


class MaskableState(Protocol):
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, batch first, as a step updates them (in place)."""


S = TypeVar("S", bound=RowsState)


@contextmanager
def rows_of(state: S, rows: torch.Tensor | None) -> Iterator[S]:
    """The state of streams `rows` to step (`state` itself when None), written back on exit."""
    if rows is None:
        yield state
        return
    part = state.take(rows)
    yield part
    state.put(rows, part)


@contextmanager
def active_of(state: MaskableState, active: torch.Tensor | None) -> Iterator[None]:
    """Around a step of every stream of `state`: the streams where `active` [B] is False get
    their state from before the step back (no-op when None). For small states (conv
    histories): a copy of the whole state per step."""
    if active is None:
        yield
        return
    tensors = state.tensors()
    before = [t.clone() for t in tensors]
    yield
    for now, old in zip(tensors, before):
        now.copy_(torch.where(active.view(-1, *([1] * (now.dim() - 1))), now, old))


@dataclass
class StateGroup:
    """States of the children of a container, reset (and taken by rows) together."""

    children: list

    def reset(self, mask: torch.Tensor | None = None) -> None:
        for child in self.children:
            if child is not None:
                child.reset(mask)

    def take(self, rows: torch.Tensor) -> "StateGroup":
        return StateGroup([None if child is None else child.take(rows) for child in self.children])

    def put(self, rows: torch.Tensor, part: "StateGroup") -> None:
        for child, stepped in zip(self.children, part.children):
            if child is not None:
                child.put(rows, stepped)

    def tensors(self) -> list[torch.Tensor]:
        return [t for child in self.children if child is not None for t in child.tensors()]


class ResettableFields:
    """Mixin for dataclass states: `reset` resets every field that is itself a state."""

    def reset(self, mask: torch.Tensor | None = None) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if hasattr(value, "reset"):
                value.reset(mask)
