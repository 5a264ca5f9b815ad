"""The web app: a Gradio UI on a FastAPI server (a Hugging Face Space runs this file).

    python app.py [--model SOURCE] [--mimi SOURCE] [--device auto|cpu|cuda] [--dtype bfloat16]
                  [--host 127.0.0.1] [--port 7860] [--live-slots N] [--live-max-seconds S]

One server: the web UI (live conversation, dialogue from a file, transcription, text to speech,
the Mimi codec), the websocket `/api/chat` (Kyutai's protocol) and the REST job API under `/v1`
(`/docs`). Without REDIS_URL the API's jobs run in this process, on the models the UI uses.
Models load on first use, so the page comes up even before the weights are downloaded. Every
flag defaults to its environment variable (docs/configuration.md).
"""

import argparse
import dataclasses
import sys

import uvicorn

from api.limits import WS_MAX_SIZE
from moshi_core.cli.main import MODEL_SOURCE_HELP
from moshi_core.errors import InvalidParameterError
from moshi_core.params import DTYPE_NAMES
from workers.settings import Settings

DEFAULT_PORT = 7860  # Gradio's, where a Hugging Face Space expects the app


def build_parser(env: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve the Moshi web app: the Gradio UI, the live chat and the "
                                                 "REST API on one FastAPI server.")
    add = parser.add_argument
    add("--model", default=env.default_model, metavar="SOURCE",
        help=f"Moshi model for dialogue: {MODEL_SOURCE_HELP} (env MOSHI_MODEL; default: %(default)s)")
    add("--dtype", default=env.dtype, choices=DTYPE_NAMES,
        help="LM weights and compute (env MOSHI_DTYPE; default: %(default)s)")
    add("--mimi", default=env.mimi, metavar="SOURCE",
        help=f"Mimi weights: {MODEL_SOURCE_HELP} (env MOSHI_MIMI; default: %(default)s)")
    add("--device", default=env.device, help="cpu, cuda, cuda:N or auto (env MOSHI_DEVICE; default: %(default)s)")
    # A Hugging Face Space sets GRADIO_SERVER_NAME=0.0.0.0 and expects the app there.
    add("--host", default=env.host, help="interface to listen on; 0.0.0.0 for all (env HOST or "
                                         "GRADIO_SERVER_NAME; default: %(default)s)")
    add("--port", type=int, default=env.port or DEFAULT_PORT, help="port to listen on (env PORT; default: %(default)s)")
    add("--live-slots", type=int, default=env.live_slots, metavar="N",
        help="live conversations at once, stepped as one batch; 0: 4 on a GPU, 1 on the CPU "
             "(env MOSHI_LIVE_SLOTS; default: %(default)s)")
    add("--live-max-seconds", type=float, default=env.live_max_seconds, metavar="SECONDS",
        help="length limit of one live conversation (env MOSHI_LIVE_MAX_SECONDS; default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        env = Settings.from_env()
    except InvalidParameterError as exc:  # a bad variable: its one line, not a traceback
        print(f"app.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    args = build_parser(env).parse_args(argv)
    settings = dataclasses.replace(
        env, models=tuple(dict.fromkeys([args.model, *env.models[1:]])), mimi=args.mimi, device=args.device,
        dtype=args.dtype, host=args.host, port=args.port, live_slots=args.live_slots,
        live_max_seconds=args.live_max_seconds)
    print(f"Moshi app on http://{settings.host}:{settings.port} (Moshi from {settings.default_model}, Mimi from "
          f"{settings.mimi}; models load on first use)")
    from ui.app import create_app  # after the arguments: --help and a bad flag answer without loading torch

    # Open streams (a Gradio client, a websocket) must not keep a stopping server up forever.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=5, ws_max_size=WS_MAX_SIZE)


if __name__ == "__main__":
    main()
