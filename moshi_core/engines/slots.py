"""Which slots of a batched streaming state hold whom: the bookkeeping every batched engine shares.

A batched engine keeps one `LMGenerator` state (and a Mimi state, where it codes audio) of N
slots, and seats one occupant (a live conversation, an offline dialogue) in each. Occupants
come and go between steps: a newcomer's slot is reset and its sampler configured with the
newcomer's parameters and seed (`join`), so nothing of the previous occupant remains, and a
step covers only the slots it names (`rows`), leaving the others' state untouched.
"""

from typing import Generic, Protocol, TypeVar

import torch

from moshi_core.errors import InvalidParameterError
from moshi_core.inference.generate import GenerationState
from moshi_core.models.mimi import MimiState
from moshi_core.params import SamplingParams


class Occupant(Protocol):
    """What a slot's sampler is configured from when its occupant joins."""

    sampling: SamplingParams
    seed: int | None  # None: a fresh random seed


T = TypeVar("T", bound=Occupant)


class SlotTable(Generic[T]):
    """N slots, each free or holding one occupant; slot i is row i of the engine's states."""

    def __init__(self, size: int, what: str) -> None:
        if size < 1:
            raise InvalidParameterError(f"a {what} needs at least 1 slot, not {size}")
        self._occupants: list[T | None] = [None] * size

    def __len__(self) -> int:
        return len(self._occupants)

    def __getitem__(self, slot: int) -> T | None:
        return self._occupants[slot]

    def seat(self, occupant: T) -> int | None:
        """The lowest free slot, now `occupant`'s; None when every slot is taken."""
        for slot, current in enumerate(self._occupants):
            if current is None:
                self._occupants[slot] = occupant
                return slot
        return None

    def release(self, slot: int) -> None:
        self._occupants[slot] = None

    def occupied(self) -> list[tuple[int, T]]:
        """(slot, occupant) of every taken slot, in slot order."""
        return [(slot, o) for slot, o in enumerate(self._occupants) if o is not None]

    def mask(self, slots: list[int]) -> torch.Tensor:
        """[N] bool, True at `slots`: the form `state.reset(mask)` takes."""
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[slots] = True
        return mask

    def rows(self, slots: list[int], device: torch.device | str) -> torch.Tensor | None:
        """The `rows` argument of a step of `slots` (in slot order): None when every slot
        steps, so the full batch goes through without gathering and scattering its state."""
        if len(slots) == len(self):
            return None
        return torch.tensor(slots, device=device)

    def join(self, slots: list[int], lm_state: GenerationState, mimi_state: MimiState | None = None) -> None:
        """Start the occupants of `slots` afresh: each slot's sampler takes its occupant's
        parameters and seed (`lm_state` is built with `per_slot_sampling`), and the slots' LM
        (and Mimi) state is reset. Nothing when empty."""
        if not slots:
            return
        for slot in slots:
            occupant = self._occupants[slot]
            lm_state.slots.configure(slot, occupant.sampling, occupant.seed)
        mask = self.mask(slots)
        lm_state.reset(mask.to(lm_state.offsets.device))
        if mimi_state is not None:
            mimi_state.reset(mask.to(mimi_state.encoder.transformer.offset.device))
