"""The in-process queue: threads of the API's own process run the jobs (no REDIS_URL).

It is what `make run` uses on a machine with nothing else installed: `dialogue_slots`
threads for Moshi jobs and one for codec jobs (so a long dialogue does not hold up a
200 ms encode), and on start it takes back the jobs a previous run left unfinished.

Each lane is fair between owners (API keys): a free thread takes the oldest job of the owner
served longest ago, so one key's queue of long jobs cannot make another key wait behind all
of it, and it prefers owners running fewer than `key_max_running` jobs. It never idles while
a job waits (a lone owner may use every thread).
"""

import collections
import itertools
import logging
import threading

from .errors import QueueUnavailableError
from .jobs import HEAVY_QUEUE, LIGHT_QUEUE, QUEUE_OF, Job, JobState, JobStore
from .models import ModelCache
from .runner import execute_job

log = logging.getLogger("moshi.workers")


class FairLane:
    """Job ids waiting per owner; `take` blocks until one is due (None once closed)."""

    def __init__(self, max_running: int) -> None:
        self.max_running = max_running
        self._changed = threading.Condition()
        self._waiting: dict[str, collections.deque[str]] = {}  # owner -> its job ids, oldest first
        self._running: collections.Counter[str] = collections.Counter()
        self._served: dict[str, int] = {}  # owner -> turn of its latest start; absent: longest ago
        self._turns = itertools.count()
        self._closed = False

    def put(self, owner: str, job_id: str) -> None:
        with self._changed:
            self._waiting.setdefault(owner, collections.deque()).append(job_id)
            self._changed.notify()

    def take(self) -> tuple[str, str] | None:
        """(owner, job id) of the next job to run, now counted as running by its owner."""
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            # Owners under the cap first; among them (or, work-conserving, among all) the one
            # served longest ago: round-robin. min() keeps arrival order between ties.
            owner = min(self._waiting, key=lambda o: (self._running[o] >= self.max_running, self._served.get(o, -1)))
            jobs = self._waiting[owner]
            job_id = jobs.popleft()
            if not jobs:
                del self._waiting[owner]
            self._running[owner] += 1
            self._served[owner] = next(self._turns)
            return owner, job_id

    def done(self, owner: str) -> None:
        with self._changed:
            self._running[owner] -= 1
            if self._running[owner] <= 0:
                del self._running[owner]
                if owner not in self._waiting:  # an owner with nothing left is "served longest ago" again
                    self._served.pop(owner, None)

    def __len__(self) -> int:
        with self._changed:
            return sum(len(jobs) for jobs in self._waiting.values())

    def close(self) -> None:
        """The threads stop after their current job; jobs still waiting stay queued in the store."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class LocalQueue:
    name = "in-process"

    def __init__(self, store: JobStore, models: ModelCache) -> None:
        self.store, self.models = store, models
        settings = models.settings
        heavy_cap = settings.key_max_running or -(-settings.dialogue_slots // 2)  # 0: half, rounded up
        self._lanes = {HEAVY_QUEUE: FairLane(heavy_cap), LIGHT_QUEUE: FairLane(1)}
        counts = {HEAVY_QUEUE: settings.dialogue_slots, LIGHT_QUEUE: 1}
        self._threads = [threading.Thread(target=self._work, args=(self._lanes[name],),
                                          name=f"worker {name} {i}", daemon=True)
                         for name, count in counts.items() for i in range(count)]
        for thread in self._threads:
            thread.start()
        for job in sorted(store.all(), key=lambda j: j.created_at):
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                self.submit(job)

    def _work(self, lane: FairLane) -> None:
        while (taken := lane.take()) is not None:
            owner, job_id = taken
            try:
                execute_job(job_id, self.store, self.models)
            except Exception:  # execute_job records job failures itself; this is a store failure
                log.exception("job %s could not be run", job_id)
            finally:
                lane.done(owner)

    def submit(self, job: Job) -> None:
        self._lanes[QUEUE_OF[job.kind]].put(job.owner, job.id)

    def check(self) -> None:
        if not all(t.is_alive() for t in self._threads):
            raise QueueUnavailableError("the in-process workers have stopped: restart the server")

    def depth(self) -> dict[str, int]:
        return {name: len(lane) for name, lane in self._lanes.items()}

    def workers(self) -> list[str]:
        return [t.name for t in self._threads if t.is_alive()]

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.close()
