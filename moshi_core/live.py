"""Live conversations: up to N at once, one batched 80 ms step for all of them.

A `LiveEngine` holds N slots of one model's streaming state (Mimi in both directions, the
LM). Each `step` takes the next 1920-sample frame of every open conversation and runs Mimi
encode -> LM step -> Mimi decode for them in one batch. The LM steps only the slots of
conversations that have started (slots join and leave between steps); Mimi, whose state
has no per-row stepping, runs every slot, free ones on silence. A step costs little more for
a few rows than for one: it is bound by reading the weights. A conversation's slot is reset (LM,
Mimi, its sampling generator) on its first step, so nothing of the previous caller remains.
A conversation starts with its first frame: until then its slot idles with the free ones.

First frame, as Kyutai's server does (reference 3.6): the LM ignores the user codes of a
conversation's first step and returns no frame; the slot's Mimi state is then reset, so the
second frame is encoded from a fresh codec state and becomes the model's first frame.

Not thread-safe: one caller at a time (`LiveDriver` runs `step` in a worker thread and keeps
`open`/`close` out of it).
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidParameterError, LiveBusyError
from .generate import LMGenerator
from .lm import UNGENERATED_TOKEN
from .models import MoshiModels
from .sampling import SamplingParams
from .text import WORD_START


@dataclass
class LiveFrame:
    """What one step gives a conversation."""

    audio: np.ndarray | None  # Moshi's next 1920 samples (float32, 24 kHz); None on the first step
    text: str  # the text piece of this step ("" for padding), word starts as a leading space


@dataclass
class _Conversation:
    sampling: SamplingParams
    seed: int | None
    steps: int = 0


class LiveEngine:
    def __init__(self, models: MoshiModels, slots: int = 1, sampling: SamplingParams | None = None) -> None:
        if slots < 1:
            raise InvalidParameterError(f"a live engine needs at least 1 slot, not {slots}")
        self.models = models
        self.sampling = sampling or SamplingParams.from_config(models.generation_defaults)
        self.generator = LMGenerator(models.lm, self.sampling)
        cfg = models.lm.cfg
        self._user_streams = cfg.num_codebooks - cfg.dep_q - 1
        self._skip = {cfg.existing_text_padding_id, cfg.existing_text_end_padding_id}
        # Built in inference mode: the steps update these tensors in place in inference mode.
        with torch.inference_mode():
            self._lm_state = self.generator.init_state(slots, per_slot_sampling=True)
            self._mimi_state = models.mimi.init_state(slots)
        self._slots: list[_Conversation | None] = [None] * slots

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @property
    def frame_size(self) -> int:
        return self.models.mimi.frame_size

    @property
    def open_slots(self) -> list[int]:
        return [i for i, c in enumerate(self._slots) if c is not None]

    def open(self, sampling: SamplingParams | None = None, seed: int | None = None) -> int:
        """A slot for a new conversation (a random seed when None); LiveBusyError when all are taken."""
        for slot, conversation in enumerate(self._slots):
            if conversation is None:
                self._slots[slot] = _Conversation(sampling or self.sampling, seed)
                return slot
        raise LiveBusyError(f"all {self.num_slots} conversation slots are in use")

    def close(self, slot: int) -> None:
        self._slots[slot] = None

    def step(self, frames: Mapping[int, np.ndarray | None]) -> dict[int, LiveFrame]:
        """One step of every open conversation: `frames[slot]` is its user's next 1920 samples
        (float32, 24 kHz; missing or None is silence, or no start yet). Returns the `LiveFrame`
        of each conversation that has started."""
        mimi, lm = self.models.mimi, self.models.lm
        wav = torch.zeros(self.num_slots, 1, self.frame_size)
        joining = [False] * self.num_slots
        for slot in self.open_slots:
            frame = frames.get(slot)
            conversation = self._slots[slot]
            if conversation.steps == 0 and frame is None:
                continue
            if frame is not None:
                if frame.shape != (self.frame_size,):
                    raise InvalidParameterError(f"a live frame is {self.frame_size} samples, got {frame.shape}")
                wav[slot, 0] = torch.from_numpy(np.asarray(frame, dtype=np.float32))
            if conversation.steps == 0:
                joining[slot] = True
                self._lm_state.slots.configure(slot, conversation.sampling, conversation.seed)
        stepped = [slot for slot in self.open_slots if self._slots[slot].steps > 0 or joining[slot]]
        with torch.inference_mode():
            mask = torch.tensor(joining)
            if any(joining):
                self._lm_state.reset(mask.to(lm.device))
                self._mimi_state.reset(mask.to(mimi.device))
            codes = mimi.encode_step(wav.to(mimi.device), self._mimi_state, self._user_streams).to(lm.device)
            out = torch.full((self.num_slots, 1 + lm.cfg.dep_q), UNGENERATED_TOKEN, device=lm.device)
            if stepped:
                rows = None if len(stepped) == self.num_slots else torch.tensor(stepped, device=lm.device)
                out[stepped] = self.generator.step(codes[stepped], self._lm_state, rows)  # [A, 1 + dep_q]
            # First steps return -2 (no frame yet): decode a placeholder, dropped below.
            audio = mimi.decode_step(out[:, 1:, None].clamp(min=0).to(mimi.device), self._mimi_state)
            if any(joining):
                self._mimi_state.reset(mask.to(mimi.device))  # the next frame is encoded afresh
        pcm = audio[:, 0].float().cpu().numpy()
        text_tokens = out[:, 0].tolist()
        results = {}
        for slot in self.open_slots:
            conversation = self._slots[slot]
            if conversation.steps == 0 and not joining[slot]:
                continue  # not started
            first = conversation.steps == 0
            conversation.steps += 1
            results[slot] = LiveFrame(audio=None if first else pcm[slot], text=self._piece(text_tokens[slot]))
        return results

    def _piece(self, token: int) -> str:
        if token in self._skip:
            return ""
        piece = self.models.tokenizer.piece(token)
        return "" if piece is None else piece.replace(WORD_START, " ")
