"""The dialogue engine of a worker process: every dialogue job on one model shares one batch.

Job threads call `run` and block until their dialogues are done; dialogues of concurrent
jobs step together in one `DialogueBatch`, so a batch costs a model's weights read once per
step for all of them (and each answer is the one it would be alone). The steps run in a
thread of the engine's own, started when work comes and ended when none is left; only that
thread touches the batch, the callers hand it their dialogues through `_inbox`.
"""

import threading

import torch

from moshi_core.engines.dialogue import Dialogue, DialogueBatch, progress_of
from moshi_core.inference.dialogue import DialogueResult, dialogue_result, encode_dialogues
from moshi_core.loading.registry import MoshiModels
from moshi_core.models.mimi import Progress
from moshi_core.params import SamplingParams

PROGRESS_INTERVAL = 0.25  # seconds between a waiting caller's progress reports


class DialogueEngine:
    """Dialogues on one model, stepped as one batch of up to `slots`; thread-safe."""

    def __init__(self, models: MoshiModels, slots: int = 4) -> None:
        self.models = models
        self._batch = DialogueBatch(models, slots)
        self._lock = threading.Lock()
        self._inbox: list[Dialogue] = []  # submitted, not yet handed to the batch
        self._done: dict[Dialogue, threading.Event] = {}  # set when the dialogue leaves the batch
        self._stepper: threading.Thread | None = None

    @property
    def num_slots(self) -> int:
        return self._batch.num_slots

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
        dialogues, users = encode_dialogues(self.models, user_audio if batched else [user_audio], sampling, seed)
        done = self._submit(dialogues)
        try:
            self._wait(dialogues, done, progress)
        except BaseException:
            for d in dialogues:
                d.cancelled = True  # a plain flag: the stepper reads it before its next step
            for event in done:
                event.wait()  # this caller's slots are free again when it returns
            raise
        results = [dialogue_result(self.models, d, user) for d, user in zip(dialogues, users)]
        return results if batched else results[0]

    def _submit(self, dialogues: list[Dialogue]) -> list[threading.Event]:
        done = [threading.Event() for _ in dialogues]
        with self._lock:
            self._inbox.extend(dialogues)
            self._done.update(zip(dialogues, done))
            if self._stepper is None:
                self._stepper = threading.Thread(target=self._step_until_idle, name="dialogue engine", daemon=True)
                self._stepper.start()
        return done

    @staticmethod
    def _wait(dialogues: list[Dialogue], done: list[threading.Event], progress: Progress | None) -> None:
        for d, event in zip(dialogues, done):
            while not event.wait(PROGRESS_INTERVAL):
                if progress is not None:
                    progress(*progress_of(dialogues))
            if d.error is not None:
                raise d.error
        if progress is not None:
            progress(*progress_of(dialogues))

    def _step_until_idle(self) -> None:
        while True:
            with self._lock:
                self._batch.join(self._inbox)
                self._inbox.clear()
                if self._batch.idle:
                    self._stepper = None
                    return
            left = self._batch.step()
            with self._lock:
                for d in left:
                    self._done.pop(d).set()
