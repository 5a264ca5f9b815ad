"""Offline dialogues on one model, stepped as one batch: one LM step per call for all of them.

Every dialogue seated in the batch is a slot of one batched LM step per frame. A dialogue
joins when a slot is free (its slot reset, its sampler seeded; it waits in line until then)
and leaves when its audio ends or it is cancelled, between steps, while the others go on. A
step reads the weights once for all slots, so on a GPU, or on a CPU where a step is bound by
memory, a batch costs little more than one dialogue. Every slot samples with its own
generator and the CPU kernels compute each row on its own, so on CPU a dialogue's answer is
the same bits alone or beside others. On CUDA every slot computes in lockstep under an active
mask (one compiled step, warmed up as the batch is built); on a CPU only the seated rows do
(`lockstep`); the numbers are the same either way.

The first frame is fed twice, as Kyutai's `run_inference` does: a dialogue's first step only
primes the delayed streams, so the second is the first that yields a frame, and every output
frame lines up with the input frame of the same time.

Driven by one caller at a time: `run_dialogue` steps it in its own thread, the workers'
engine from a stepping thread of its own.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from moshi_core.engines.slots import SlotTable, warm_up
from moshi_core.inference.generate import LMGenerator
from moshi_core.inference.step_batch import lockstep_default
from moshi_core.loading.registry import MoshiModels
from moshi_core.params import SamplingParams


@dataclass(eq=False)  # compared and hashed by identity: callers key their waits on dialogues
class Dialogue:
    """One dialogue: the user's codes, and what its steps gave so far."""

    codes: torch.Tensor  # [n_user, F] on the LM's device
    sampling: SamplingParams
    seed: int | None
    steps: int = 0  # LM steps taken: F + 1 in all (the first frame is fed twice)
    frames: list[torch.Tensor] = field(default_factory=list)  # [1 + dep_q] per output frame
    peak_batch: int = 0  # the most dialogues stepped together while this one ran
    cancelled: bool = False  # set by its caller; the batch drops it before its next step
    error: Exception | None = None  # why its step failed

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1]

    @property
    def finished(self) -> bool:
        return self.steps == self.num_frames + 1


def progress_of(dialogues: list[Dialogue]) -> tuple[int, int]:
    """(frames answered, frames in all) of some dialogues: a caller's progress."""
    return sum(len(d.frames) for d in dialogues), sum(d.num_frames for d in dialogues)


class DialogueBatch:
    """Up to `slots` dialogues stepped together; more wait in line for a free slot."""

    def __init__(self, models: MoshiModels, slots: int = 4, lockstep: bool | None = None) -> None:
        """`lockstep`: step every slot under an active mask (None: on CUDA) or only the seated rows."""
        self._table: SlotTable[Dialogue] = SlotTable(slots, "dialogue engine")
        self._waiting: deque[Dialogue] = deque()
        self._device = models.lm.device
        self.generator = LMGenerator(models.lm, SamplingParams.from_config(models.generation_defaults),
                                     gpu_step=models.gpu_step)
        with torch.inference_mode():  # the steps update the state in place in inference mode
            self._state = self.generator.init_state(slots, per_slot_sampling=True)
        self.lockstep = lockstep_default(self._device) if lockstep is None else lockstep
        warm_up("dialogue batch", self.lockstep, self.generator, self._state)

    @property
    def num_slots(self) -> int:
        return len(self._table)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._table.occupied()

    def join(self, dialogues: Iterable[Dialogue]) -> None:
        """Queue dialogues: each is seated, in order, at the first step with a free slot."""
        self._waiting.extend(dialogues)

    def step(self) -> list[Dialogue]:
        """Seat waiting dialogues in free slots and step every seated one once. Returns the
        dialogues that left the batch: finished, cancelled, or failed (their `error` set: a
        failed step fails the dialogues in it, the batch goes on with the next)."""
        left = []
        for slot, d in self._table.occupied():
            if d.cancelled:
                self._table.release(slot)
                left.append(d)
        joining = self._seat(left)
        seated = self._table.occupied()
        if seated:
            try:
                self._step(seated, joining)
            except Exception as exc:  # a failed step fails the dialogues in it, not the batch
                for _, d in seated:
                    d.error = exc
        for slot, d in seated:
            if d.finished or d.error is not None:
                self._table.release(slot)
                left.append(d)
        return left

    def _seat(self, left: list[Dialogue]) -> list[int]:
        """Seat waiting dialogues while slots are free; cancelled ones go to `left` unseated."""
        joining = []
        while self._waiting:
            d = self._waiting[0]
            if d.cancelled:
                left.append(self._waiting.popleft())
                continue
            slot = self._table.seat(d)
            if slot is None:
                break
            self._waiting.popleft()
            joining.append(slot)
        return joining

    def _step(self, seated: list[tuple[int, Dialogue]], joining: list[int]) -> None:
        with torch.inference_mode():
            self._table.join(joining, self._state)
            # A dialogue's first step feeds its first frame (priming), then frame t at step t + 1.
            codes = torch.stack([d.codes[:, max(d.steps - 1, 0)] for _, d in seated])[..., None]  # [A, n_user, 1]
            batch = self._table.batch([slot for slot, _ in seated], self.lockstep)
            out = batch.outputs(self.generator.step(batch.inputs(codes), self._state, batch.rows(self._device),
                                                    batch.active(self._device)))  # [A, 1 + dep_q]
        for (_, d), frame in zip(seated, out):
            if d.steps > 0:
                d.frames.append(frame)
            d.steps += 1
            d.peak_batch = max(d.peak_batch, len(seated))
