"""Serve the REST API alone (no web UI): `python -m api [--host H] [--port P]`.

With REDIS_URL set it only queues jobs for `celery -A workers worker` processes; without,
it runs them itself on threads. `python app.py` serves the same API beside the web UI.
"""

import argparse
import logging
import sys

import uvicorn

from moshi_core.errors import MoshiError
from workers.errors import SettingsError
from workers.settings import Settings

from .app import create_api
from .limits import WS_MAX_SIZE

DEFAULT_PORT = 8000


def main(argv: list[str] | None = None) -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(str(exc))  # one line on stderr, exit status 1
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=settings.host,
                        help="interface to listen on; 0.0.0.0 for all (env HOST; default: %(default)s)")
    parser.add_argument("--port", type=int, default=settings.port or DEFAULT_PORT,
                        help="port (env PORT; default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = create_api(settings)
    except MoshiError as exc:
        parser.error(str(exc))
    # Open streams (a Gradio client, a websocket) must not keep a stopping server up forever.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                ws_max_size=WS_MAX_SIZE)


if __name__ == "__main__":
    main()
