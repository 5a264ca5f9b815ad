"""Which slots of a batched streaming state hold whom: the bookkeeping every batched engine shares.

A batched engine keeps one `LMGenerator` state (and a Mimi state, where it codes audio) of N
slots, and seats one occupant (a live conversation, an offline dialogue) in each. Occupants
come and go between steps: a newcomer's slot is reset and its sampler configured with the
newcomer's parameters and seed (`join`), so nothing of the previous occupant remains, and a
step leaves the state of the slots it does not step untouched.

Two ways to step some slots, with the same numbers (`moshi_core.inference.step_batch`): only
their rows (faster on a CPU), or every slot in lockstep under an active mask (on CUDA).
"""

import logging
from typing import Generic, Protocol, TypeVar

import torch

from moshi_core.errors import InvalidParameterError
from moshi_core.inference.generate import GenerationState, LMGenerator
from moshi_core.inference.step_batch import StepBatch
from moshi_core.loading.progress import WARMING_UP, report_stage
from moshi_core.models.mimi import MimiModel, MimiState
from moshi_core.params import SamplingParams


class Occupant(Protocol):
    """What a slot's sampler is configured from when its occupant joins."""

    sampling: SamplingParams
    seed: int | None  # None: a fresh random seed


T = TypeVar("T", bound=Occupant)
log = logging.getLogger(__name__)


def warm_up(what: str, lockstep: bool, generator: LMGenerator, lm_state: GenerationState,
            mimi: MimiModel | None = None, mimi_state: MimiState | None = None, encoded: int = 0,
            decoded: int | None = None) -> float | None:
    """Run an engine's compiled lockstep steps on its own states (reset afterwards) now, so
    that compilation and CUDA-graph capture (a graph per state) happen as the engine is built,
    never in a user's first step: the LM's, and Mimi's (encoding `encoded` codebooks,
    decoding `decoded` unless None) where given. Reported as the WARMING_UP stage of the load
    it runs under, and logged. Returns the seconds taken; None, doing nothing, when the engine
    does not step in lockstep or nothing of it is compiled (a CPU)."""
    warm_lm, warm_mimi = generator.compiled, mimi is not None and mimi.compiled
    if not lockstep or not (warm_lm or warm_mimi):
        return None
    report_stage(WARMING_UP)
    seconds = generator.warm_up(lm_state) if warm_lm else 0.0
    if warm_mimi:
        seconds += mimi.warm_up(mimi_state, encoded, decoded)
    log.info("%s: compiled steps warmed up for %d slots in %.1f s", what, lm_state.batch_size, seconds)
    return seconds


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

    def batch(self, slots: list[int], lockstep: bool) -> StepBatch:
        """A step of `slots` (in slot order), by rows or in lockstep."""
        return StepBatch(slots, len(self), lockstep)

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
