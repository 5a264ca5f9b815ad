"""Load progress: what each model's load is doing now, for the terminal, the page and the job API.

A `LoadProgress` is a thread-safe record of one `LoadStatus` per model (its latest), with
observers called on every change. A load runs inside `record.loading(name)`; code deep inside
it (a Hub download, a kernel build) reports through `report_stage` and `report_download`, which
find the load they run under in a context variable, so no loader passes a progress object down.
Nothing here starts a thread, prints or talks to the network.
"""

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

DOWNLOADING = "downloading"
BUILDING_KERNELS = "building CPU kernels"
LOADING_WEIGHTS = "loading weights"  # also: checking the files' versions, between downloads
WARMING_UP = "warming up"  # an engine's compiled step runs once, so CUDA graphs are captured before any user
READY = "ready"
FAILED = "failed"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadStatus:
    model: str  # the loader's name for it: "moshi", "mimi", "stt", "tts"
    stage: str
    started_at: float  # wall clock, when this load began
    file: str | None = None  # while downloading
    done: int | None = None  # bytes of `file` so far
    total: int | None = None  # its size, when the server says
    rate: float | None = None  # bytes per second since its download began
    eta: float | None = None  # seconds left at that rate
    error: str | None = None  # when failed

    def to_dict(self) -> dict:
        """The fields that have a value (JSON-ready)."""
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        """One line for a person: `moshi: downloading model.gguf 1.2 GB of 8.2 GB, 20.0 MB/s, 6 min left`."""
        text = f"{self.model}: {self.stage}"
        if self.stage == DOWNLOADING:
            text += f" {self.file} {format_bytes(self.done or 0)}"
            text += f" of {format_bytes(self.total)}" if self.total else ""
            text += f", {format_bytes(self.rate)}/s" if self.rate else ""
            text += f", {format_seconds(self.eta)} left" if self.eta is not None else ""
        elif self.stage == FAILED:
            text += f": {self.error}"
        return text


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


Observer = Callable[[LoadStatus], None]
_CURRENT: contextvars.ContextVar[tuple["LoadProgress", str] | None] = contextvars.ContextVar("load", default=None)


class LoadProgress:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._status: dict[str, LoadStatus] = {}
        self._download_start: dict[str, tuple[str, float, int]] = {}  # model -> (file, when, bytes then)
        self._observers: list[Observer] = []

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer` with every change (in the loading thread: it must be quick); returns
        the function that unsubscribes it."""
        with self._lock:
            self._observers.append(observer)

        def unsubscribe() -> None:
            with self._lock:
                if observer in self._observers:
                    self._observers.remove(observer)
        return unsubscribe

    def snapshot(self) -> dict[str, LoadStatus]:
        with self._lock:
            return dict(self._status)

    def unfinished(self) -> dict[str, LoadStatus]:
        """The loads under way or failed (a ready model is not listed)."""
        return {name: s for name, s in self.snapshot().items() if s.stage != READY}

    @contextlib.contextmanager
    def loading(self, model: str, stage: str = LOADING_WEIGHTS) -> Iterator[None]:
        """Record the load of `model` that runs inside, from `stage`: ready at the end, failed on an exception."""
        self._set(LoadStatus(model, stage, self._clock()))
        token = _CURRENT.set((self, model))
        try:
            yield
        except BaseException as exc:
            self.stage(model, FAILED, error=str(exc) or type(exc).__name__)
            raise
        else:
            self.stage(model, READY)
        finally:
            _CURRENT.reset(token)

    def stage(self, model: str, stage: str, *, file: str | None = None, error: str | None = None) -> None:
        with self._lock:
            started = self._status[model].started_at if model in self._status else self._clock()
            self._download_start.pop(model, None)
        self._set(LoadStatus(model, stage, started, file=file, error=error))

    def download(self, model: str, file: str, done: int, total: int | None) -> None:
        now = self._clock()
        with self._lock:
            started = self._status[model].started_at if model in self._status else now
            begun_file, begun_at, begun_bytes = self._download_start.setdefault(model, (file, now, done))
            if begun_file != file:
                begun_at, begun_bytes = now, done
                self._download_start[model] = (file, now, done)
        elapsed = now - begun_at
        rate = (done - begun_bytes) / elapsed if elapsed > 0 and done > begun_bytes else None
        eta = (total - done) / rate if rate and total else None
        self._set(LoadStatus(model, DOWNLOADING, started, file=file, done=done, total=total, rate=rate, eta=eta))

    def _set(self, status: LoadStatus) -> None:
        with self._lock:
            self._status[status.model] = status
            observers = list(self._observers)
        for observer in observers:  # outside the lock: an observer may read the record
            try:
                observer(status)
            except Exception:  # noqa: BLE001 (a broken observer must not fail the load it watches)
                log.exception("a load observer failed")


def report_stage(stage: str, file: str | None = None) -> None:
    """Tell the load this code runs under (if any) that it is now at `stage`."""
    if (current := _CURRENT.get()) is not None:
        record, model = current
        record.stage(model, stage, file=file)


def report_download(file: str, done: int, total: int | None) -> None:
    """Tell the load this code runs under (if any) how far the download of `file` is."""
    if (current := _CURRENT.get()) is not None:
        record, model = current
        record.download(model, file, done, total)
