"""Models loaded once per worker process and shared by every job it runs.

Loading is lazy: the first job that needs a model loads it. That keeps a prefork parent
from ever touching CUDA (a CUDA context does not survive a fork) and keeps Celery's
process start-up short (its pool kills children that take more than a few seconds to boot).
"""

import threading

from moshi_core.inference.stt import load_stt
from moshi_core.inference.tts import TTSModel, load_tts
from moshi_core.kernels.build import set_enabled
from moshi_core.loading.checkpoints import load_mimi
from moshi_core.loading.device import parse_dtype, resolve_device
from moshi_core.loading.registry import MoshiModels, load_moshi
from moshi_core.models.mimi import MimiModel

from .dialogue_engine import DialogueEngine
from .settings import Settings


class ModelCache:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The process that loads models is the one whose kernels the settings choose.
        set_enabled(settings.cpu_kernels)
        self._lock = threading.Lock()
        self._mimi: MimiModel | None = None
        self._moshi: dict[str, MoshiModels] = {}
        self._dialogue: dict[str, DialogueEngine] = {}
        self._stt: MoshiModels | None = None
        self._tts: TTSModel | None = None

    def mimi(self) -> MimiModel:
        with self._lock:
            if self._mimi is None:
                self._mimi = load_mimi(self.settings.mimi, device=resolve_device(self.settings.device))
            return self._mimi

    def stt(self) -> MoshiModels:
        with self._lock:
            if self._stt is None:
                self._stt = load_stt(
                    self.settings.stt_model, device=resolve_device(self.settings.device),
                    dtype=parse_dtype(self.settings.dtype), gpu_step=self.settings.gpu_step,
                )
            return self._stt

    def tts(self) -> TTSModel:
        with self._lock:
            if self._tts is None:
                self._tts = load_tts(
                    self.settings.tts_model, voices=self.settings.tts_voices,
                    device=resolve_device(self.settings.device), dtype=parse_dtype(self.settings.dtype),
                )
            return self._tts

    def moshi(self, model: str) -> MoshiModels:
        model = self.settings.check_model(model)
        with self._lock:
            if model not in self._moshi:
                self._moshi[model] = load_moshi(
                    model, device=resolve_device(self.settings.device), dtype=parse_dtype(self.settings.dtype),
                    gpu_step=self.settings.gpu_step,
                )
            return self._moshi[model]

    def dialogue(self, model: str) -> DialogueEngine:
        """The engine that batches every dialogue job of this process on `model`."""
        model = self.settings.check_model(model)
        moshi = self.moshi(model)
        with self._lock:
            if model not in self._dialogue:
                self._dialogue[model] = DialogueEngine(moshi, slots=self.settings.dialogue_slots)
            return self._dialogue[model]
