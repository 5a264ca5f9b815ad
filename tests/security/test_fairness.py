"""One key cannot hold the heavy lane or the live slots while another key waits.

The in-process queue is driven with a fake `execute_job` that records which job starts and
blocks until the test lets it finish, so no model runs; `/api/chat` is served for real on
loopback behind `KeyGuard`, with two keys. Each attack worked before issue 15.
"""

import asyncio
import queue
import threading
import time

import pytest
import websockets
from fastapi import FastAPI
from live_client import last_message_before_close
from servers import serving_in_thread

import workers.local_queue
from api.auth import install_auth
from api.chat import create_chat_router
from api.live_driver import LiveDriver
from moshi_core.engines.live import LiveEngine
from workers.jobs import Job, JobKind, JobState, JobStore, new_job_id
from workers.local_queue import LocalQueue
from workers.models import ModelCache
from workers.settings import Settings

HANDSHAKE = b"\x00" + bytes(8)
BUSY_FOR_KEY = (b"\x05busy: this API key already has 1 conversation(s) open, the most one key may hold at once; "
                b"end one and try again")


class FakeRunner:
    """Stands for `execute_job`: each job reports its start, then runs until `finish(job)`."""

    def __init__(self) -> None:
        self.started: queue.Queue[str] = queue.Queue()
        self._finish: dict[str, threading.Event] = {}

    def _event(self, job_id: str) -> threading.Event:
        return self._finish.setdefault(job_id, threading.Event())

    def __call__(self, job_id: str, store: JobStore, models: ModelCache) -> None:
        self.started.put(job_id)
        self._event(job_id).wait(10)

    def finish(self, job: Job) -> None:
        self._event(job.id).set()

    def next_started(self) -> str:
        return self.started.get(timeout=5)

    def starts(self, count: int) -> set[str]:
        return {self.next_started() for _ in range(count)}

    def nothing_more_started(self) -> bool:
        time.sleep(0.2)  # a free thread takes a waiting job within microseconds
        return self.started.empty()

    def finish_all(self) -> None:
        for event in list(self._finish.values()):
            event.set()


@pytest.fixture
def runner(monkeypatch):
    fake = FakeRunner()
    monkeypatch.setattr(workers.local_queue, "execute_job", fake)
    yield fake
    fake.finish_all()


@pytest.fixture
def make_queue(tmp_path, runner):
    made = []

    def make(slots: int, **settings) -> tuple[LocalQueue, JobStore]:
        store = JobStore(tmp_path)
        lane = LocalQueue(store, ModelCache(Settings(storage_dir=tmp_path, dialogue_slots=slots, **settings)))
        made.append(lane)
        return lane, store

    yield make
    for lane in made:
        lane.close()


def tts_job(owner: str, state: JobState = JobState.QUEUED) -> Job:
    return Job(id=new_job_id(), kind=JobKind.TTS, owner=owner, params={}, input_name="text.txt", state=state)


def test_another_keys_job_starts_before_the_rest_of_a_long_queue(make_queue, runner):
    lane, _ = make_queue(slots=2)
    a_jobs = [tts_job("a") for _ in range(4)]
    for job in a_jobs:
        lane.submit(job)
    assert runner.starts(2) == {a_jobs[0].id, a_jobs[1].id}  # every heavy thread is A's
    b_job = tts_job("b")
    lane.submit(b_job)
    assert lane.depth()["moshi.lm"] == 3
    runner.finish(a_jobs[0])
    assert runner.next_started() == b_job.id  # was a_jobs[2]: B waited behind all of A's queue
    runner.finish(a_jobs[1])
    assert runner.next_started() == a_jobs[2].id


def test_a_key_at_its_running_cap_gives_a_free_thread_to_another_key(make_queue, runner):
    lane, _ = make_queue(slots=3, key_max_running=2)
    a_jobs = [tts_job("a") for _ in range(5)]
    for job in a_jobs[:3]:
        lane.submit(job)
    # Work-conserving: alone, A may use every thread, over its cap.
    assert runner.starts(3) == {job.id for job in a_jobs[:3]}
    b_jobs = [tts_job("b") for _ in range(2)]
    for job in [*a_jobs[3:], *b_jobs]:
        lane.submit(job)
    runner.finish(a_jobs[0])
    assert runner.next_started() == b_jobs[0].id  # FIFO: a_jobs[3]
    runner.finish(b_jobs[0])
    # A runs 2, its cap: B's second job goes first, though A was served longer ago.
    assert runner.next_started() == b_jobs[1].id
    assert runner.nothing_more_started()
    runner.finish(a_jobs[1])
    assert runner.next_started() == a_jobs[3].id


def test_unfinished_jobs_are_taken_up_again_at_start_and_fairly(tmp_path, make_queue, runner):
    store = JobStore(tmp_path)
    done = tts_job("a", JobState.SUCCEEDED)
    interrupted = tts_job("a", JobState.RUNNING)
    a_queued = [tts_job("a") for _ in range(2)]
    b_queued = tts_job("b")
    for age, job in enumerate([done, interrupted, *a_queued, b_queued]):
        job.created_at = 1000.0 + age  # oldest first: the order a restart takes them up in
        store.create(job, {})
    make_queue(slots=1)
    assert runner.next_started() == interrupted.id
    runner.finish(interrupted)
    assert runner.next_started() == b_queued.id  # FIFO: a_queued[0]
    runner.finish(b_queued)
    assert runner.next_started() == a_queued[0].id
    runner.finish(a_queued[0])
    assert runner.next_started() == a_queued[1].id
    runner.finish(a_queued[1])
    assert runner.nothing_more_started()  # the finished job was not run again


@pytest.fixture(scope="module")
def chat_url(tiny_models):
    app = FastAPI()
    app.include_router(create_chat_router(LiveDriver(lambda: LiveEngine(tiny_models, slots=2)), max_seconds=60,
                                          idle_seconds=10, max_per_key=1))
    install_auth(app, Settings(api_keys=frozenset({"key-a", "key-b"})))
    with serving_in_thread(app) as address:
        yield f"ws://{address}/api/chat?codec=pcm"


async def greeting_once_free(url: str) -> bytes:
    """The first message of a conversation at `url`, retried (for 5 s at most) while the server
    still counts the caller's previous one, which it hears of ending just after the caller."""
    for _ in range(50):
        async with websockets.connect(url) as ws:
            first = await asyncio.wait_for(ws.recv(), 10)
        if first != BUSY_FOR_KEY:
            return first
        await asyncio.sleep(0.1)
    return first


@pytest.mark.e2e
def test_one_key_cannot_hold_every_live_slot(chat_url):
    async def main():
        async with websockets.connect(chat_url + "&api_key=key-a") as first:
            assert await asyncio.wait_for(first.recv(), 10) == HANDSHAKE
            async with websockets.connect(chat_url + "&api_key=key-a") as second:
                refused = await last_message_before_close(second)  # was a handshake: key A took the second slot too
            async with websockets.connect(chat_url + "&api_key=key-b") as other:
                greeting = await asyncio.wait_for(other.recv(), 10)
        return refused, greeting, await greeting_once_free(chat_url + "&api_key=key-a")

    (message, code), greeting, again = asyncio.run(main())
    assert code == 1013 and message == BUSY_FOR_KEY, message
    assert greeting == HANDSHAKE and again == HANDSHAKE
