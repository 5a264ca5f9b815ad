"""Offline dialogue: the user's side of a conversation from a file, Moshi's answer out.

The same step as a live session (`LMGenerator`), driven by the file's frames: Mimi encodes
the user's audio, Moshi listens and speaks frame by frame, Mimi decodes Moshi's codes. The
first frame is fed twice, as Kyutai's `run_inference` does: the model's first step only
primes the delayed streams, so the second is the first that yields a frame, and every output
frame lines up with the input frame of the same time.

Many dialogues share one model through a `DialogueEngine`: every dialogue running on it is a
slot of one batched LM step per frame. A dialogue joins the batch when it is submitted (its
slot reset, its sampler seeded) and leaves it when its audio ends, between steps, while the
others go on. A step reads the weights once for all slots, so on a GPU, or on a CPU where a
step is bound by memory, a batch costs little more than one dialogue. Every slot samples
with its own generator and the CPU kernels compute each row on its own, so on CPU a
dialogue's answer is the same bits alone or beside others.
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.audio import pad_batch
from moshi_core.formats.text import TextStream, Word
from moshi_core.inference.generate import LMGenerator
from moshi_core.loading.registry import MoshiModels
from moshi_core.params import SamplingParams

Progress = Callable[[int, int], None]
PROGRESS_INTERVAL = 0.25  # seconds between a waiting caller's progress reports


@dataclass
class DialogueResult:
    audio: torch.Tensor  # Moshi's voice [1, T], 24 kHz
    stereo: torch.Tensor  # [2, T]: user left, Moshi right
    words: list[Word]  # Moshi's inner monologue, timed
    text: str
    tokens: torch.Tensor  # [1 + dep_q, F]: text then audio codes, one column per frame
    peak_batch: int = 1  # the most dialogues stepped together while this one ran

    def transcript(self) -> dict:
        return {"text": self.text, "words": [w.to_dict() for w in self.words]}


@dataclass
class _Dialogue:
    """One dialogue in an engine: its user codes, and what its steps gave so far."""

    codes: torch.Tensor  # [n_user, F] on the LM's device
    sampling: SamplingParams
    seed: int | None
    steps: int = 0  # LM steps taken: F + 1 in all (the first frame is fed twice)
    frames: list[torch.Tensor] = field(default_factory=list)  # [1 + dep_q] per output frame
    peak_batch: int = 0
    cancelled: bool = False
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def total_steps(self) -> int:
        return self.codes.shape[1] + 1


class DialogueEngine:
    """Dialogues on one model, stepped as one batch of up to `slots`; thread-safe.

    `run` blocks its caller until its dialogues are done; concurrent callers (the worker's
    job threads) are batched together, the extra ones wait for a free slot. The steps run in
    a thread of the engine's own, started when work comes and ended when none is left.
    """

    def __init__(self, models: MoshiModels, slots: int = 4) -> None:
        if slots < 1:
            raise InvalidParameterError(f"a dialogue engine needs at least 1 slot, not {slots}")
        self.models = models
        self.generator = LMGenerator(models.lm, SamplingParams.from_config(models.generation_defaults),
                                     gpu_step=models.gpu_step)
        with torch.inference_mode():  # the steps update the state in place in inference mode
            self._state = self.generator.init_state(slots, per_slot_sampling=True)
        self._slots: list[_Dialogue | None] = [None] * slots
        self._waiting: deque[_Dialogue] = deque()
        self._lock = threading.Lock()
        self._stepper: threading.Thread | None = None

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def run(
        self,
        user_audio: torch.Tensor | list[torch.Tensor],
        *,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        progress: Progress | None = None,
    ) -> DialogueResult | list[DialogueResult]:
        """Moshi's side of a conversation with each 24 kHz waveform [1, T] (a list: several
        dialogues, each as if alone with `seed`). `progress(frames done, frames)` is called
        from this thread; an exception it raises (a cancellation) ends these dialogues."""
        batched = isinstance(user_audio, list)
        wavs = user_audio if batched else [user_audio]
        if not wavs:
            raise InvalidParameterError("no audio for the dialogue")
        sampling = sampling or self.generator.sampling
        lm, mimi = self.models.lm, self.models.mimi
        batch, lengths = pad_batch(wavs)
        user_streams = lm.cfg.num_codebooks - lm.cfg.dep_q - 1
        with torch.inference_mode():
            codes = mimi.encode(batch.to(mimi.device), num_codebooks=user_streams).to(lm.device)
        frames = [-(-n // mimi.frame_size) for n in lengths]
        dialogues = [_Dialogue(codes[i, :, :f], sampling, seed) for i, f in enumerate(frames)]
        self._submit(dialogues)
        try:
            self._wait(dialogues, progress)
        except BaseException:
            with self._lock:
                for d in dialogues:
                    d.cancelled = True
            for d in dialogues:
                d.done.wait()
            raise
        results = [self._result(d, batch[i, :, :n], n) for i, (d, n) in enumerate(zip(dialogues, lengths))]
        return results if batched else results[0]

    # -- the caller's side ----------------------------------------------------------------------

    def _submit(self, dialogues: list[_Dialogue]) -> None:
        with self._lock:
            self._waiting.extend(dialogues)
            if self._stepper is None:
                self._stepper = threading.Thread(target=self._step_until_idle, name="dialogue engine", daemon=True)
                self._stepper.start()

    @staticmethod
    def _wait(dialogues: list[_Dialogue], progress: Progress | None) -> None:
        total = sum(d.total_steps - 1 for d in dialogues)
        for d in dialogues:
            while not d.done.wait(PROGRESS_INTERVAL):
                if progress is not None:
                    progress(sum(max(x.steps - 1, 0) for x in dialogues), total)
            if d.error is not None:
                raise d.error
        if progress is not None:
            progress(total, total)

    def _result(self, d: _Dialogue, user: torch.Tensor, n: int) -> DialogueResult:
        models, cfg = self.models, self.models.lm.cfg
        tokens = torch.stack(d.frames, dim=-1)  # [1 + dep_q, F]
        with torch.inference_mode():
            moshi = models.mimi.decode(tokens[None, 1:].to(models.mimi.device)).cpu()[0, :, :n]
        text = TextStream(models.tokenizer, frame_rate=models.mimi.frame_rate,
                          skip=(cfg.existing_text_end_padding_id, cfg.existing_text_padding_id))
        for t, token in enumerate(tokens[0].tolist()):
            text.push(token, t)
        words = text.flush()
        return DialogueResult(audio=moshi, stereo=torch.cat([user, moshi]), words=words, text=text.text,
                              tokens=tokens.cpu(), peak_batch=d.peak_batch)

    # -- the stepping thread --------------------------------------------------------------------

    def _step_until_idle(self) -> None:
        while True:
            with self._lock:
                joining = self._admit()
                active = [(i, d) for i, d in enumerate(self._slots) if d is not None]
                if not active:
                    self._stepper = None
                    return
            try:
                self._step(active, joining)
            except Exception as exc:  # a failed step fails the dialogues in it, not the engine
                with self._lock:
                    for i, d in active:
                        d.error = exc
                        self._release(i)

    def _admit(self) -> list[int]:
        """Free the slots of finished or cancelled dialogues; seat waiting ones. Under the lock."""
        for i, d in enumerate(self._slots):
            if d is not None and (d.cancelled or d.steps == d.total_steps):
                self._release(i)
        joining = []
        for i in range(self.num_slots):
            if self._slots[i] is None and self._waiting:
                d = self._waiting.popleft()
                if d.cancelled:
                    d.done.set()
                    continue
                self._slots[i] = d
                joining.append(i)
        return joining

    def _release(self, slot: int) -> None:
        self._slots[slot].done.set()
        self._slots[slot] = None

    def _step(self, active: list[tuple[int, _Dialogue]], joining: list[int]) -> None:
        device = self.models.lm.device
        with torch.inference_mode():
            if joining:
                for i in joining:
                    d = self._slots[i]
                    self._state.slots.configure(i, d.sampling, d.seed)
                mask = torch.zeros(self.num_slots, dtype=torch.bool)
                mask[joining] = True
                self._state.reset(mask.to(device))
            # A dialogue's first step feeds its first frame (priming), then frame t at step t + 1.
            codes = torch.stack([d.codes[:, max(d.steps - 1, 0)] for _, d in active])[..., None]
            rows = None if len(active) == self.num_slots else torch.tensor([i for i, _ in active], device=device)
            out = self.generator.step(codes, self._state, rows)
        for (_, d), frame in zip(active, out):
            if d.steps > 0:
                d.frames.append(frame)
            d.steps += 1
            d.peak_batch = max(d.peak_batch, len(active))


def run_dialogue(
    models: MoshiModels,
    user_audio: torch.Tensor | list[torch.Tensor],
    *,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> DialogueResult | list[DialogueResult]:
    """Moshi's side of a conversation with each 24 kHz waveform [1, T] (a list is one batch,
    each file answered as if alone with `seed`)."""
    slots = len(user_audio) if isinstance(user_audio, list) else 1
    engine = DialogueEngine(models, slots=max(slots, 1))
    return engine.run(user_audio, sampling=sampling, seed=seed, progress=progress)
