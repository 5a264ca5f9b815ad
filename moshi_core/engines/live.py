"""Live conversations: up to N at once, one batched 80 ms step for all of them.

A `LiveEngine` holds N slots of one model's streaming state (Mimi in both directions, the
LM). Each `step` takes the next 1920-sample frame of every open conversation and runs Mimi
encode -> LM step -> Mimi decode for them in one batch. Only the slots of conversations that
have started advance (slots join and leave between steps): on a CPU only their rows are
computed (free ones cost nothing); on CUDA every slot computes in lockstep under an active
mask, so one compiled step (a CUDA graph, captured as the engine is built) replays every
step; the numbers are the same either way (`lockstep`). A step costs little more for a few
rows than for one: it is bound by reading the weights. A conversation's slot is reset (LM,
Mimi, its sampling generator) on its first step, so nothing of the previous caller remains.
A conversation starts with its first frame: until then its slot idles like the free ones.

One conversation's failure is its own: a bad frame, or a seed or parameter its slot cannot be
configured with, ends that conversation (its `LiveFrame.error`) and no other; its slot is not
stepped again until it is closed. Only a failure of the batched compute itself (a bug, the
machine) reaches every conversation, as the exception `step` raises.

First frame, as Kyutai's server does: the LM ignores the user codes of a
conversation's first step and returns no frame; the slot's Mimi state is then reset, so the
second frame is encoded from a fresh codec state and becomes the model's first frame.

Not thread-safe: one caller at a time (`LiveDriver` runs `step` in a worker thread and keeps
`open`/`close` out of it).
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from moshi_core.engines.slots import SlotTable, warm_up
from moshi_core.errors import InvalidParameterError, LiveBusyError
from moshi_core.formats.text import WORD_START
from moshi_core.inference.generate import LMGenerator
from moshi_core.inference.step_batch import lockstep_default
from moshi_core.loading.registry import MoshiModels
from moshi_core.params import SamplingParams


@dataclass
class LiveFrame:
    """What one step gives a conversation."""

    audio: np.ndarray | None  # Moshi's next 1920 samples (float32, 24 kHz); None on the first step
    text: str  # the text piece of this step ("" for padding), word starts as a leading space
    error: str | None = None  # the conversation failed and ends: why (audio None, text "")


@dataclass
class _Conversation:
    sampling: SamplingParams
    seed: int | None
    steps: int = 0
    failed: bool = False  # ended by its own error: never stepped again


class LiveEngine:
    def __init__(self, models: MoshiModels, slots: int = 1, sampling: SamplingParams | None = None,
                 lockstep: bool | None = None) -> None:
        """`lockstep`: step every slot under an active mask (None: on CUDA) or only the
        conversations' rows."""
        self._table: SlotTable[_Conversation] = SlotTable(slots, "live engine")
        self.models = models
        self.sampling = sampling or SamplingParams.from_config(models.generation_defaults)
        self.generator = LMGenerator(models.lm, self.sampling, gpu_step=models.gpu_step)
        cfg = models.lm.cfg
        self._user_streams = cfg.num_codebooks - cfg.dep_q - 1
        self._skip = {cfg.existing_text_padding_id, cfg.existing_text_end_padding_id}
        # Built in inference mode: the steps update these tensors in place in inference mode.
        with torch.inference_mode():
            self._lm_state = self.generator.init_state(slots, per_slot_sampling=True)
            self._mimi_state = models.mimi.init_state(slots)
        self.lockstep = lockstep_default(models.lm.device) if lockstep is None else lockstep
        warm_up("live engine", self.lockstep, self.generator, self._lm_state, models.mimi, self._mimi_state,
                self._user_streams, cfg.dep_q)

    @property
    def num_slots(self) -> int:
        return len(self._table)

    @property
    def frame_size(self) -> int:
        return self.models.mimi.frame_size

    @property
    def open_slots(self) -> list[int]:
        return [slot for slot, _ in self._table.occupied()]

    def open(self, sampling: SamplingParams | None = None, seed: int | None = None) -> int:
        """A slot for a new conversation (a random seed when None); LiveBusyError when all are taken."""
        slot = self._table.seat(_Conversation(sampling or self.sampling, seed))
        if slot is None:
            raise LiveBusyError("the one conversation slot is in use" if self.num_slots == 1
                                else f"all {self.num_slots} conversation slots are in use")
        return slot

    def configure(self, slot: int, sampling: SamplingParams, seed: int | None) -> None:
        """New sampling parameters and seed for a conversation that has not started yet."""
        conversation = self._table[slot]
        if conversation.steps:
            raise InvalidParameterError("sampling and seed are set before the conversation's first audio")
        conversation.sampling, conversation.seed = sampling, seed

    def close(self, slot: int) -> None:
        self._table.release(slot)

    def step(self, frames: Mapping[int, np.ndarray | None]) -> dict[int, LiveFrame]:
        """One step of every open conversation: `frames[slot]` is its user's next 1920 samples
        (float32, 24 kHz; missing or None is silence, or no start yet). Returns the `LiveFrame`
        of each conversation that has started."""
        mimi, lm = self.models.mimi, self.models.lm
        live = [(s, c) for s, c in self._table.occupied() if not c.failed]
        failures = {slot: self._frame_problem(frames.get(slot)) for slot, _ in live}
        results = {slot: self._fail(slot, problem) for slot, problem in failures.items() if problem}
        # A conversation starts with its first frame: until then its slot idles like a free one.
        joining = [s for s, c in live if c.steps == 0 and frames.get(s) is not None and s not in results]
        with torch.inference_mode():
            for slot in joining:
                try:  # one by one: a seed or parameter that cannot be set ends its own conversation only
                    self._table.join([slot], self._lm_state, self._mimi_state)
                except Exception as exc:  # noqa: BLE001 (whatever it is, it is this caller's alone)
                    results[slot] = self._fail(slot, f"cannot start the conversation: {exc}")
        joining = [s for s in joining if s not in results]
        stepped = [s for s, c in live if (c.steps > 0 or s in joining) and s not in results]
        if not stepped:
            return results
        wav = torch.zeros(len(stepped), 1, self.frame_size)
        for i, slot in enumerate(stepped):
            if frames.get(slot) is not None:
                wav[i, 0] = torch.from_numpy(np.asarray(frames[slot], dtype=np.float32))
        batch = self._table.batch(stepped, self.lockstep)
        with torch.inference_mode():
            mimi_rows, mimi_active = batch.rows(mimi.device), batch.active(mimi.device)
            codes = mimi.encode_step(batch.inputs(wav).to(mimi.device), self._mimi_state, self._user_streams,
                                     mimi_rows, mimi_active)
            out = self.generator.step(codes.to(lm.device), self._lm_state, batch.rows(lm.device),
                                      batch.active(lm.device))  # [A or N, 1 + dep_q]
            # First steps (and free slots in lockstep) return -2: decode a placeholder, dropped below.
            audio = mimi.decode_step(out[:, 1:, None].clamp(min=0).to(mimi.device), self._mimi_state, mimi_rows,
                                     mimi_active)
            if joining:
                self._mimi_state.reset(self._table.mask(joining).to(mimi.device))  # the next frame is encoded afresh
            out, audio = batch.outputs(out), batch.outputs(audio)
        pcm = audio[:, 0].float().cpu().numpy()
        text_tokens = out[:, 0].tolist()
        for i, slot in enumerate(stepped):
            self._table[slot].steps += 1
            results[slot] = LiveFrame(audio=None if slot in joining else pcm[i], text=self._piece(text_tokens[i]))
        return results

    def _frame_problem(self, frame: np.ndarray | None) -> str | None:
        if frame is None:
            return None
        if np.shape(frame) != (self.frame_size,):
            return f"a live frame is {self.frame_size} samples, got {np.shape(frame)}"
        if not np.isfinite(frame).all():
            return "a live frame holds NaN or infinite samples"
        return None

    def _fail(self, slot: int, message: str) -> LiveFrame:
        self._table[slot].failed = True
        return LiveFrame(audio=None, text="", error=message)

    def _piece(self, token: int) -> str:
        if token in self._skip:
            return ""
        piece = self.models.tokenizer.piece(token)
        return "" if piece is None else piece.replace(WORD_START, " ")
