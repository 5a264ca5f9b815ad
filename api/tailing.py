"""Streaming a job's output file to a client while the worker still writes it.

The API process never loads a model: a worker appends to a file in the job folder (TTS audio,
transcription words) and the endpoint tails that file until the job ends.
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.responses import JSONResponse

from workers.errors import JobTimeoutError
from workers.jobs import Job, JobState

from .errors import job_problem, render
from .service import JobService

POLL_SECONDS = 0.02


async def wait_for_output(jobs: JobService, job_id: str, path: Path, what: str) -> Job | JSONResponse:
    """The job once `path` has its first bytes or the job has ended; an error answer instead
    when it failed before any output, or when no worker started it in time (then withdrawn).

    Holding the answer until then gives a failure before any output a proper error status."""
    deadline = asyncio.get_running_loop().time() + jobs.settings.sync_timeout_seconds
    while True:
        job = jobs.store.get(job_id)
        if job.state.finished or (path.exists() and path.stat().st_size > 0):
            break
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(POLL_SECONDS)
    if job.state is JobState.QUEUED and await asyncio.to_thread(jobs.withdraw, job.id):
        raise JobTimeoutError(f"no worker was free to start the {what} within {jobs.settings.sync_timeout_seconds:g} "
                              "s (the server is busy); the request was withdrawn: try again later, or submit it as a "
                              "job and poll it")
    job = jobs.store.get(job.id)  # started, perhaps since the wait ended
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        return render(job_problem(job.error, what), openai=True)
    return job


async def tail(jobs: JobService, job: Job, owner: str, path: Path) -> AsyncIterator[bytes]:
    """The bytes appended to `path` as they come, until the job ends (then `jobs.store.get`
    tells how it ended); a client that leaves cancels the job."""
    offset, finished = 0, False
    try:
        while True:
            finished = jobs.store.get(job.id).state.finished  # before reading: then nothing is missed
            data = await asyncio.to_thread(_read_from, path, offset)
            offset += len(data)
            if data:
                yield data
            if finished:
                break
            await asyncio.sleep(POLL_SECONDS)
    finally:
        if not finished:
            jobs.cancel(job.id, owner)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:  # the job ended (failed) before writing any
        return b""
