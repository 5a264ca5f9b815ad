"""The in-process queue: threads of the API's own process run the jobs (no REDIS_URL).

It is what `make run` uses on a machine with nothing else installed: `dialogue_slots`
threads for Moshi jobs and one for codec jobs (so a long dialogue does not hold up a
200 ms encode), and on start it takes back the jobs a previous run left unfinished.
"""

import logging
import queue
import threading

from .errors import QueueUnavailableError
from .jobs import HEAVY_QUEUE, LIGHT_QUEUE, QUEUE_OF, Job, JobState, JobStore
from .models import ModelCache
from .runner import execute_job

log = logging.getLogger("moshi.workers")


class LocalQueue:
    name = "in-process"

    def __init__(self, store: JobStore, models: ModelCache) -> None:
        self.store, self.models = store, models
        self._queues = {name: queue.Queue() for name in (HEAVY_QUEUE, LIGHT_QUEUE)}
        counts = {HEAVY_QUEUE: models.settings.dialogue_slots, LIGHT_QUEUE: 1}
        self._lanes = [  # (queue, one of the threads taking from it)
            (self._queues[name], threading.Thread(target=self._work, args=(self._queues[name],),
                                                  name=f"worker {name} {i}", daemon=True))
            for name, count in counts.items() for i in range(count)
        ]
        self._threads = [thread for _, thread in self._lanes]
        for thread in self._threads:
            thread.start()
        for job in sorted(store.all(), key=lambda j: j.created_at):
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                self.submit(job)

    def _work(self, jobs: queue.Queue) -> None:
        while (job_id := jobs.get()) is not None:
            try:
                execute_job(job_id, self.store, self.models)
            except Exception:  # execute_job records job failures itself; this is a store failure
                log.exception("job %s could not be run", job_id)

    def submit(self, job: Job) -> None:
        self._queues[QUEUE_OF[job.kind]].put(job.id)

    def check(self) -> None:
        if not all(t.is_alive() for t in self._threads):
            raise QueueUnavailableError("the in-process workers have stopped: restart the server")

    def depth(self) -> dict[str, int]:
        return {name: q.qsize() for name, q in self._queues.items()}

    def workers(self) -> list[str]:
        return [t.name for t in self._threads if t.is_alive()]

    def close(self) -> None:
        for jobs, _ in self._lanes:  # one stop mark per thread
            jobs.put(None)
