"""The API application: routes, error answers, upload limit, and the queue's lifetime."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI

from workers.jobs import JobStore
from workers.queue import make_queue
from workers.settings import Settings

from .auth import install_auth
from .docs import install_docs
from .errors import install_error_handlers
from .limits import install_limits
from .routes import router
from .service import JobService
from .speech import router as speech_router
from .transcription import router as transcription_router

if TYPE_CHECKING:  # only the in-process queue loads models (make_queue imports them then)
    from workers.models import ModelCache

log = logging.getLogger("moshi.api")

DESCRIPTION = """Batch jobs on Kyutai's Moshi and its Mimi codec.

Submit a file (`POST /v1/dialogue`, `/v1/codec/encode`, `/v1/codec/decode`): the answer is
`202 Accepted` with the job and `Location: /v1/jobs/{id}`. Poll the job until its `state`
is `succeeded`, then download `/v1/jobs/{id}/result` or a named artifact. Errors are JSON
`{"error": {"code", "message"}}`. With API keys configured, send `Authorization: Bearer <key>` (websockets: the
`kyutai-api-key` header or `?api_key=`; browsers: the cookie `/login` sets).
"""


async def _purge_forever(store: JobStore, ttl: float) -> None:
    while True:
        try:
            purged = await asyncio.to_thread(store.purge_expired, ttl)
            if purged:
                log.info("removed %d expired jobs", purged)
        except OSError:
            log.exception("could not purge expired jobs")
        await asyncio.sleep(min(ttl / 4, 600))


def create_api(settings: Settings | None = None, models: "ModelCache | None" = None, **fastapi_options) -> FastAPI:
    """The REST API as an app of its own; the web app (app.py) adds the UI to it.

    `models`: the process's loaded models, shared with the in-process queue (no REDIS_URL)
    so that a job and the web UI never load a model twice.
    """
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = JobStore(settings.storage_dir)
        queue = make_queue(settings, store, models)
        app.state.jobs = JobService(settings, store, queue)
        purge = asyncio.create_task(_purge_forever(store, settings.job_ttl_seconds))
        log.info("jobs in %s, queue: %s", settings.storage_dir, queue.name)
        try:
            yield
        finally:
            purge.cancel()
            queue.close()

    # The docs pages are this server's own (install_docs): FastAPI's load their scripts from a CDN.
    app = FastAPI(title="Moshi serving stack", description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None, **fastapi_options)
    install_docs(app)
    install_error_handlers(app)
    install_limits(app, settings)
    install_auth(app, settings)  # outermost: no body is read before the key is checked
    app.include_router(router)
    app.include_router(transcription_router)
    app.include_router(speech_router)
    return app
