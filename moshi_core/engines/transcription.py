"""Live transcriptions: up to N streams at once, one batched 80 ms STT step for all of them.

A `TranscriptionEngine` holds N slots of one speech-to-text model's streaming state (Mimi
encoder, LM, word segmenter). Each `step` takes the next 1920-sample frame of the streams
that have one and advances only those (their rows, or every slot under an active mask on
CUDA: see `Transcriber`), so a caller who pauses sending loses nothing: its stream simply
waits. A stream is an utterance: `finish` feeds the silence the model needs to catch up
with its delay, closes the last word and starts the slot afresh for the next one.

Voice activity: where the model has Kyutai's voice-activity heads, each step reports the
probability that the speaker has finished (the head Kyutai's own server reads, the third);
without heads it is None and no one can tell pauses from speech but the caller.

Not thread-safe: one caller at a time (the API's driver runs it in a worker thread).
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from moshi_core.engines.slots import SlotTable, warm_up
from moshi_core.errors import LiveBusyError
from moshi_core.formats.text import Word
from moshi_core.inference.stt import Transcriber
from moshi_core.loading.registry import MoshiModels
from moshi_core.params import SamplingParams

PAUSE_HEAD = 2  # of the 1B's four heads, the one Kyutai's server reads as "the turn is over"


@dataclass
class TranscriptionStep:
    """What one step (or `finish`) gives a stream."""

    words: list[Word]  # the words this step completed
    pause: float | None  # probability the speaker has finished; None without voice-activity heads


@dataclass
class _Stream:
    sampling: SamplingParams  # what SlotTable's Occupant asks for; STT decodes greedily
    seed: int | None = None
    frames: int = 0  # frames stepped since the stream (re)started, its silence prefix included


class TranscriptionEngine:
    def __init__(self, models: MoshiModels, slots: int = 1, lockstep: bool | None = None) -> None:
        """`lockstep`: step every slot under an active mask (None: on CUDA) or only the streams' rows."""
        self.transcriber = Transcriber(models, lockstep=lockstep)
        self._table: SlotTable[_Stream] = SlotTable(slots, "transcription engine")
        with torch.inference_mode():
            self._state = self.transcriber.init_state(slots)
        warm_up("transcription engine", self.transcriber.lockstep, self.transcriber.generator, self._state.lm,
                models.mimi, self._state.mimi, self.transcriber.num_codebooks)
        self.has_voice_activity = models.lm.cfg.extra_heads_num_heads > PAUSE_HEAD

    @property
    def num_slots(self) -> int:
        return len(self._table)

    @property
    def frame_size(self) -> int:
        return self.transcriber.frame_size

    @property
    def frame_rate(self) -> float:
        return self.transcriber.frame_rate

    def open(self) -> int:
        """A slot for a new stream; LiveBusyError when all are taken."""
        slot = self._table.seat(_Stream(self.transcriber.generator.sampling))
        if slot is None:
            raise LiveBusyError(f"all {self.num_slots} transcription slots are in use")
        self._restart(slot)
        return slot

    def close(self, slot: int) -> None:
        self._table.release(slot)

    def step(self, frames: Mapping[int, np.ndarray]) -> dict[int, TranscriptionStep]:
        """The next 1920 samples (float32, 24 kHz) of each stream in `frames`; the others wait."""
        slots = sorted(frames)
        if not slots:
            return {}
        pcm = torch.from_numpy(np.stack([np.asarray(frames[s], dtype=np.float32) for s in slots]))[:, None]
        return self._step(slots, pcm)

    def finish(self, slot: int) -> list[Word]:
        """End the stream of `slot`: the words still to come, its last included; the slot then
        starts a new stream."""
        words: list[Word] = []
        silence = self.transcriber.silence(1)
        for _ in range(self.transcriber.tail_frames):
            words += self._step([slot], silence)[slot].words
        segmenter = self._state.words[slot]
        before = len(segmenter.words)
        words += segmenter.flush()[before:]
        self._restart(slot)
        return words

    def _step(self, slots: list[int], pcm: torch.Tensor) -> dict[int, TranscriptionStep]:
        starting = [s for s in slots if self._table[s].frames == 0]
        if starting:  # the model's first step never sees its audio: lead with silence
            prefix = self.transcriber.silence(self.transcriber.prefix_frames, len(starting))
            for i in range(self.transcriber.prefix_frames):
                self.transcriber.step(prefix[..., i * self.frame_size : (i + 1) * self.frame_size], self._state,
                                      starting)
        result = self.transcriber.step(pcm, self._state, slots)
        pauses = result.pause[:, PAUSE_HEAD].tolist() if self.has_voice_activity else [None] * len(slots)
        out = {}
        for i, slot in enumerate(slots):
            self._table[slot].frames += 1
            out[slot] = TranscriptionStep(result.words[i], pauses[i])
        return out

    def _restart(self, slot: int) -> None:
        with torch.inference_mode():
            self.transcriber.reset(self._state, self._table.mask([slot]))
        self._table[slot].frames = 0
