"""Driving a `TranscriptionEngine` from asyncio: sessions push audio and commits, one loop steps them.

The step runs in a worker thread, so the event loop serving the sockets is never blocked by
it. Unlike a conversation, a transcription has no clock of its own: a step runs as soon as
any session has a frame waiting, and only the sessions with one are stepped. A commit waits
in line behind the audio sent before it, so it ends the utterance exactly there. A session
holds at most `max_queued_seconds` of audio not yet stepped (more is `LiveInputError`). A
step that fails as a whole ends every session with its error rather than stopping the loop.
"""

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moshi_core.engines.transcription import TranscriptionEngine
from moshi_core.errors import LiveInputError
from moshi_core.formats.pcm import SAMPLE_RATE
from moshi_core.formats.text import Word

COMMIT = None  # in a session's queue, between frames: the utterance ends here


@dataclass
class TranscriptionEvent:
    """What the loop hands a session: one step's words and pause probability, a finished
    utterance (`committed`, its last words in `words`), or the session's end (`error`)."""

    words: list[Word]
    pause: float | None = None
    committed: bool = False
    error: str | None = None


class TranscriptionSession:
    """One stream: `push` audio, `commit` the utterance, `await next_event()` for words."""

    def __init__(self, slot: int, frame_size: int, wake: asyncio.Event, max_queued_seconds: float) -> None:
        self.slot = slot
        self._frame_size, self._wake, self._max_queued = frame_size, wake, max_queued_seconds
        self._partial = np.zeros(0, dtype=np.float32)
        self._queue: collections.deque[np.ndarray | None] = collections.deque()
        self._out: asyncio.Queue[TranscriptionEvent] = asyncio.Queue()

    def push(self, pcm: np.ndarray) -> None:
        """24 kHz float32 samples; whole frames are queued. LiveInputError past `max_queued_seconds`."""
        frames = sum(item is not COMMIT for item in self._queue)
        queued = (frames * self._frame_size + len(self._partial) + len(pcm)) / SAMPLE_RATE
        if queued > self._max_queued:
            raise LiveInputError(f"{queued:.1f} s of audio would wait for the model, the limit is "
                                 f"{self._max_queued:g} s; send it as it is recorded")
        samples = np.concatenate([self._partial, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        whole = len(samples) // self._frame_size * self._frame_size
        self._queue.extend(samples[i : i + self._frame_size] for i in range(0, whole, self._frame_size))
        self._partial = samples[whole:]
        if whole:
            self._wake.set()

    def commit(self) -> None:
        """End the utterance after the audio pushed so far (a partial frame is padded with silence)."""
        if len(self._partial):
            self._queue.append(np.pad(self._partial, (0, self._frame_size - len(self._partial))))
            self._partial = np.zeros(0, dtype=np.float32)
        self._queue.append(COMMIT)
        self._wake.set()

    def clear(self) -> None:
        """Drop the audio not yet stepped (what was already transcribed stays)."""
        self._queue = collections.deque(item for item in self._queue if item is COMMIT)
        self._partial = np.zeros(0, dtype=np.float32)

    async def next_event(self) -> TranscriptionEvent:
        return await self._out.get()


class TranscriptionDriver:
    """Owns one engine (built on first use, in a thread) and the loop that steps it."""

    def __init__(self, load_engine: Callable[[], TranscriptionEngine], max_queued_seconds: float = 30.0) -> None:
        self._load_engine = load_engine
        self.max_queued_seconds = max_queued_seconds
        self._engine: TranscriptionEngine | None = None
        self._load_lock = asyncio.Lock()
        self._step_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._sessions: dict[int, TranscriptionSession] = {}
        self._loop_task: asyncio.Task | None = None

    @property
    def sessions(self) -> list[TranscriptionSession]:
        return list(self._sessions.values())

    async def engine(self) -> TranscriptionEngine:
        async with self._load_lock:
            if self._engine is None:
                self._engine = await asyncio.to_thread(self._load_engine)
            return self._engine

    async def open(self) -> TranscriptionSession:
        """A new stream; LiveBusyError when every slot is taken."""
        engine = await self.engine()
        async with self._step_lock:
            slot = engine.open()
            session = TranscriptionSession(slot, engine.frame_size, self._wake, self.max_queued_seconds)
            self._sessions[slot] = session
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        return session

    async def close(self, session: TranscriptionSession) -> None:
        async with self._step_lock:
            if self._sessions.get(session.slot) is session:
                del self._sessions[session.slot]
                self._engine.close(session.slot)
        self._wake.set()

    async def _run(self) -> None:
        while self._sessions:
            self._wake.clear()
            ready = [s for s in self._sessions.values() if s._queue]
            if not ready:
                await self._wake.wait()
                continue
            async with self._step_lock:
                ready = [s for s in self.sessions if s._queue]  # a caller may have left meanwhile
                # The queues are taken here, on the event loop: the thread only computes.
                commits = [s for s in ready if s._queue[0] is COMMIT]
                for s in commits:
                    s._queue.popleft()
                frames = {s.slot: s._queue.popleft() for s in ready if s not in commits}
                try:
                    finished, outputs = await asyncio.to_thread(self._compute, [s.slot for s in commits], frames)
                except Exception as exc:  # noqa: BLE001 (the batch failed: every session ends, the loop lives)
                    failed = TranscriptionEvent([], error=f"the transcription step failed ({type(exc).__name__})")
                    for s in self.sessions:
                        s._out.put_nowait(failed)
                        s._queue.clear()
                    continue
                for s in commits:
                    s._out.put_nowait(TranscriptionEvent(finished[s.slot], committed=True))
                for s in ready:
                    if s.slot in outputs:
                        s._out.put_nowait(TranscriptionEvent(outputs[s.slot].words, outputs[s.slot].pause))

    def _compute(self, commits: list[int], frames: dict[int, np.ndarray]):
        """In the worker thread: finish the committed streams, then step the others one frame."""
        finished = {slot: self._engine.finish(slot) for slot in commits}
        return finished, self._engine.step(frames)
