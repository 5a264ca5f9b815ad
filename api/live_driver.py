"""Real-time driving of a `LiveEngine` from asyncio: sessions push audio, one loop steps them.

The model step runs in a worker thread, so the event loop that serves the sockets is never
blocked by it. A step runs as soon as every started conversation (one that has sent a frame)
has a frame waiting; when some have one and others do not, it waits at most `max_wait` (one
frame, 80 ms) for the late ones and then gives them silence (an underrun, counted), so one
stalled caller cannot stall the rest. A caller who sends faster than real time is answered
as fast as the model goes, but never buffered without limit: a session holds at most
`max_queued_seconds` of the caller's audio, and more ends it (`LiveInputError`). A step that
fails as a whole ends every conversation with its error rather than stopping the loop.
A draining driver (`drain`) refuses new conversations and lets the open ones run to their end.
"""

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moshi_core.engines.live import LiveEngine, LiveFrame
from moshi_core.errors import InvalidParameterError, LiveBusyError, LiveInputError
from moshi_core.formats.pcm import SAMPLE_RATE
from moshi_core.params import SamplingParams


@dataclass
class SessionStats:
    slot: int
    started: float = field(default_factory=time.time)
    frames_in: int = 0  # whole 1920-sample frames received from the caller
    frames_out: int = 0  # frames of Moshi's audio handed out
    text_pieces: int = 0
    underruns: int = 0  # steps where the caller's frame was late and silence went in
    ended: float | None = None


class LiveSession:
    """One conversation: `push` the caller's audio, `await next_frame()` for Moshi's."""

    def __init__(self, slot: int, frame_size: int, wake: asyncio.Event, max_queued_seconds: float) -> None:
        self.stats = SessionStats(slot)
        self._frame_size = frame_size
        self._max_queued = max_queued_seconds
        self._wake = wake
        self._partial = np.zeros(0, dtype=np.float32)  # samples short of a whole frame
        self._frames: collections.deque[tuple[float, np.ndarray]] = collections.deque()  # (arrival, frame)
        self._out: asyncio.Queue[LiveFrame] = asyncio.Queue()

    @property
    def slot(self) -> int:
        return self.stats.slot

    def push(self, pcm: np.ndarray) -> None:
        """24 kHz float32 samples; whole frames are queued for the next steps. Raises
        `LiveInputError` when that would queue more than `max_queued_seconds` of audio."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        queued = (len(self._frames) * self._frame_size + len(self._partial) + len(pcm)) / SAMPLE_RATE
        if queued > self._max_queued:
            raise LiveInputError(f"audio arrives faster than real time: {queued:.1f} s would wait, the limit is "
                                 f"{self._max_queued:g} s; send it as it is recorded")
        samples = np.concatenate([self._partial, pcm])
        whole = len(samples) // self._frame_size * self._frame_size
        now = time.monotonic()
        for start in range(0, whole, self._frame_size):
            self._frames.append((now, samples[start : start + self._frame_size]))
        self._partial = samples[whole:]
        self.stats.frames_in += whole // self._frame_size
        if whole:
            self._wake.set()

    async def next_frame(self) -> LiveFrame:
        return await self._out.get()

    def _waiting_since(self) -> float | None:
        return self._frames[0][0] if self._frames else None

    @property
    def _started(self) -> bool:
        return self.stats.frames_in > 0

    def _take(self) -> np.ndarray | None:
        if self._frames:
            return self._frames.popleft()[1]
        self.stats.underruns += self._started
        return None

    def _deliver(self, frame: LiveFrame) -> None:
        self.stats.frames_out += frame.audio is not None
        self.stats.text_pieces += bool(frame.text)
        self._out.put_nowait(frame)


class LiveDriver:
    """Owns one engine (built on first use, in a thread: loading weights takes a while) and
    the loop that steps it while conversations are open."""

    def __init__(self, load_engine: Callable[[], LiveEngine], max_wait: float = 0.08, history: int = 32,
                 max_queued_seconds: float = 4.0) -> None:
        self._load_engine = load_engine
        self.max_wait = max_wait
        self.max_queued_seconds = max_queued_seconds
        self._engine: LiveEngine | None = None
        self._load_lock = asyncio.Lock()
        self._step_lock = asyncio.Lock()  # open/close never run while a step does
        self._wake = asyncio.Event()
        self._sessions: dict[int, LiveSession] = {}
        self._admitting = 0  # callers in `open`, waiting for a step to end before they are seated
        self.draining = False
        self._loop_task: asyncio.Task | None = None
        self.ended: collections.deque[SessionStats] = collections.deque(maxlen=history)
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=1000)

    @property
    def sessions(self) -> list[LiveSession]:
        return list(self._sessions.values())

    @property
    def num_slots(self) -> int | None:
        """None until the engine is loaded."""
        return None if self._engine is None else self._engine.num_slots

    @property
    def free_slots(self) -> int | None:
        """Slots a new caller could still take (None until the engine is loaded). A caller counts
        from the moment `open` is called, so two callers at once never both see the last slot."""
        if self._engine is None:
            return None
        return max(self._engine.num_slots - len(self._sessions) - self._admitting, 0)

    def drain(self) -> None:
        """From now on, refuse new conversations; the open ones go on to their end."""
        self.draining = True

    async def engine(self) -> LiveEngine:
        async with self._load_lock:
            if self._engine is None:
                self._engine = await asyncio.to_thread(self._load_engine)
            return self._engine

    async def open(self, sampling: SamplingParams | None = None, seed: int | None = None) -> LiveSession:
        """A new conversation; raises LiveBusyError when every slot is taken or the driver drains."""
        engine = await self.engine()
        self._admitting += 1
        try:
            async with self._step_lock:
                if self.draining:  # under the lock: a drain may have begun while this caller waited
                    raise LiveBusyError("this server is draining before it stops and takes no new conversations")
                slot = engine.open(sampling, seed)
                session = LiveSession(slot, engine.frame_size, self._wake, self.max_queued_seconds)
                self._sessions[slot] = session
        finally:
            self._admitting -= 1  # no await since the seat was added: it is never counted twice
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        return session

    async def configure(self, session: LiveSession, sampling: SamplingParams, seed: int | None) -> None:
        """New sampling parameters and seed for a conversation before its first audio
        (InvalidParameterError after it)."""
        async with self._step_lock:
            if session._started:  # its first frame may be queued, not yet stepped: too late all the same
                raise InvalidParameterError("sampling and seed are set before the conversation's first audio")
            self._engine.configure(session.slot, sampling, seed)

    async def close(self, session: LiveSession) -> None:
        async with self._step_lock:
            if self._sessions.get(session.slot) is session:
                del self._sessions[session.slot]
                self._engine.close(session.slot)
                session.stats.ended = time.time()
                self.ended.append(session.stats)
        self._wake.set()

    async def _run(self) -> None:
        while self._sessions:
            await self._until_frames_are_due()
            async with self._step_lock:
                sessions = self.sessions
                if not any(s._waiting_since() is not None for s in sessions):
                    continue  # the callers with frames left meanwhile
                frames = {s.slot: s._take() for s in sessions}
                start = time.perf_counter()
                try:
                    outputs = await asyncio.to_thread(self._engine.step, frames)
                except Exception as exc:  # noqa: BLE001 (the batch failed: every conversation ends, the loop lives)
                    failed = LiveFrame(audio=None, text="", error=f"the model step failed ({type(exc).__name__})")
                    outputs = {s.slot: failed for s in sessions}
                self.step_seconds.append(time.perf_counter() - start)
                for s in sessions:
                    if s.slot in outputs:
                        s._deliver(outputs[s.slot])

    async def _until_frames_are_due(self) -> None:
        while self._sessions:
            self._wake.clear()
            arrivals = [s._waiting_since() for s in self._sessions.values() if s._started]
            waiting = [t for t in arrivals if t is not None]
            if waiting and len(waiting) == len(arrivals):
                return
            timeout = None
            if waiting:
                timeout = min(waiting) + self.max_wait - time.monotonic()
                if timeout <= 0:
                    return
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return
