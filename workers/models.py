"""Models loaded once per worker process and shared by every job it runs.

Loading is lazy: the first job that needs a model loads it. That keeps a prefork parent
from ever touching CUDA (a CUDA context does not survive a fork) and keeps Celery's
process start-up short (its pool kills children that take more than a few seconds to boot).
"""

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from moshi_core.errors import MoshiError
from moshi_core.inference.stt import load_stt
from moshi_core.inference.tts import TTSModel, load_tts
from moshi_core.kernels.build import kernels, set_enabled, supported
from moshi_core.kernels.q8 import set_gpu_q8, set_int8_activations
from moshi_core.loading.checkpoints import load_mimi
from moshi_core.loading.device import parse_dtype, resolve_device
from moshi_core.loading.progress import (
    BUILDING_KERNELS,
    DOWNLOADING,
    LOADING_WEIGHTS,
    READY,
    WARMING_UP,
    LoadProgress,
    LoadStatus,
    Observer,
    report_stage,
)
from moshi_core.loading.registry import MoshiModels, load_moshi
from moshi_core.models.mimi import MimiModel

from .dialogue_engine import DialogueEngine
from .jobs import public_name
from .settings import Settings

log = logging.getLogger("moshi.loading")
DOWNLOAD_LOG_SECONDS = 5.0  # a download's progress line at most this often
T = TypeVar("T")
# The observer of the caller waiting for a model in this context (a job's record, a page's bar).
_WATCHER: contextvars.ContextVar[Observer | None] = contextvars.ContextVar("watcher", default=None)


class LoadLog:
    """The loads, in the log: a line per stage, and a download's progress every few seconds."""

    def __init__(self, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._clock = logger, clock
        self._shown: dict[str, tuple[str, str | None, float]] = {}  # model -> (stage, file, when)

    def __call__(self, status: LoadStatus) -> None:
        now = self._clock()
        stage, file, when = self._shown.get(status.model, ("", None, 0.0))
        finished = status.total is not None and status.done == status.total
        if (status.stage, status.file) == (stage, file) and (
                status.stage != DOWNLOADING or now - when < DOWNLOAD_LOG_SECONDS and not finished):
            return
        self._shown[status.model] = (status.stage, status.file, now)
        if status.stage == READY:
            self._log.info("%s: ready (%.1f s)", status.model, time.time() - status.started_at)
        else:
            self._log.info("%s", status.describe())


class ModelCache:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The process that loads models is the one whose kernels the settings choose.
        set_enabled(settings.cpu_kernels)
        set_int8_activations(settings.q8_activations == "int8")
        set_gpu_q8(settings.gpu_q8)
        self.progress = LoadProgress()  # what each model's load is doing, for the log, the page and jobs
        self.progress.subscribe(LoadLog())
        self._lock = threading.Lock()  # guards the dicts below, never held while loading
        self._locks: dict[str, threading.Lock] = {}  # one per model: one model's download holds up no other
        self._loaded: dict[str, object] = {}
        self._dialogue: dict[str, DialogueEngine] = {}

    @contextlib.contextmanager
    def watching(self, observer: Observer) -> Iterator[None]:
        """Inside, `observer` hears how the load of each model this context waits for goes."""
        token = _WATCHER.set(observer)
        try:
            yield
        finally:
            _WATCHER.reset(token)

    def _get(self, name: str, load: Callable[[], T]) -> T:
        """The model `name`: loaded by `load` on first use, by one caller while the others wait."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]  # type: ignore[return-value]
            lock = self._locks.setdefault(name, threading.Lock())
        watcher = _WATCHER.get()
        stop_watching = self.progress.subscribe(lambda s: s.model == name and watcher(s)) if watcher else None
        try:
            if watcher and (now := self.progress.snapshot().get(name)) is not None and now.stage != READY:
                watcher(now)  # a load already under way: where it is
            with lock:
                if name not in self._loaded:
                    with self.progress.loading(name):
                        self._build_kernels()
                        model = load()
                    with self._lock:
                        self._loaded[name] = model
                return self._loaded[name]  # type: ignore[return-value]
        finally:
            if stop_watching:
                stop_watching()

    def _build_kernels(self) -> None:
        """The CPU kernels, built (or their cached build loaded) before the first model on the CPU, as
        a stage of its own: the first build takes a minute, which would otherwise look like a hang."""
        if (self.settings.cpu_kernels and kernels.cache_info().currsize == 0 and supported()
                and resolve_device(self.settings.device).type == "cpu"):
            report_stage(BUILDING_KERNELS)
            kernels()
            report_stage(LOADING_WEIGHTS)

    def moshi_name(self, model: str) -> str:
        """How loads of `model` are named (`/readyz`, the log): `moshi` for the default."""
        return "moshi" if model == self.settings.default_model else f"moshi {public_name(model)}"

    def mimi(self) -> MimiModel:
        return self._get("mimi", lambda: load_mimi(self.settings.mimi, device=resolve_device(self.settings.device)))

    def stt(self) -> MoshiModels:
        return self._get("stt", lambda: load_stt(
            self.settings.stt_model, device=resolve_device(self.settings.device),
            dtype=parse_dtype(self.settings.dtype), gpu_step=self.settings.gpu_step,
            quantize=self.settings.quantize,
        ))

    def tts(self) -> TTSModel:
        return self._get("tts", lambda: load_tts(
            self.settings.tts_model, voices=self.settings.tts_voices,
            device=resolve_device(self.settings.device), dtype=parse_dtype(self.settings.dtype),
            quantize=self.settings.quantize,
        ))

    def moshi(self, model: str) -> MoshiModels:
        model = self.settings.check_model(model)
        return self._get(self.moshi_name(model), lambda: load_moshi(
            model, device=resolve_device(self.settings.device), dtype=parse_dtype(self.settings.dtype),
            gpu_step=self.settings.gpu_step, quantize=self.settings.quantize,
        ))

    def dialogue(self, model: str) -> DialogueEngine:
        """The engine that batches every dialogue job of this process on `model`."""
        model = self.settings.check_model(model)
        moshi = self.moshi(model)
        with self._lock:  # not held while an engine warms up: other models' callers go on
            lock = self._locks.setdefault(f"dialogue {model}", threading.Lock())
        with lock:
            if model not in self._dialogue:
                engine = self.engine(self.moshi_name(model), moshi,
                                     lambda: DialogueEngine(moshi, slots=self.settings.dialogue_slots))
                with self._lock:
                    self._dialogue[model] = engine
            return self._dialogue[model]

    def engine(self, name: str, models: MoshiModels, build: Callable[[], T]) -> T:
        """An engine on the loaded model `name` (`models`), built by `build`. Where its step is
        compiled (CUDA), building it warms the step up (graph capture): that runs as a stage of
        the model's load record (`/readyz`, the log, a waiting page), whose `ready` line then
        gives the warm-up's time. Elsewhere, just `build()`."""
        if not models.compiles:
            return build()
        with self.progress.loading(name, WARMING_UP):
            return build()

    def preload(self) -> None:
        """Load the models `settings.preload` names, one after another (`start_preload` runs this
        in a thread). A failure is logged and left in `progress`; the next caller tries again."""
        loaders = {"moshi": lambda: self.moshi(self.settings.default_model), "mimi": self.mimi, "stt": self.stt,
                   "tts": self.tts}
        for name in self.settings.preload:
            try:
                loaders[name]()
            except MoshiError:
                pass  # LoadLog has logged it, `progress` shows it
            except Exception:  # noqa: BLE001 (a bug or the machine: logged, the server goes on)
                log.exception("preloading %s failed", name)

    def start_preload(self) -> threading.Thread | None:
        if not self.settings.preload:
            return None
        thread = threading.Thread(target=self.preload, name="moshi-preload", daemon=True)
        thread.start()
        return thread
