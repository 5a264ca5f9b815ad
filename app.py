"""The web app: a Gradio UI on a FastAPI server (a Hugging Face Space runs this file).

    python app.py [--model SOURCE] [--mimi SOURCE] [--device auto|cpu|cuda] [--dtype bfloat16] [--quantize q8]
                  [--host 127.0.0.1] [--port 7860] [--live-slots N] [--live-max-seconds S]
                  [--preload none|all|moshi,mimi,stt,tts]

One server: the web UI (live conversation, dialogue from a file, transcription, text to speech,
the Mimi codec), the websocket `/api/chat` (Kyutai's protocol) and the REST job API under `/v1`
(`/docs`). Without REDIS_URL the API's jobs run in this process, on the models the UI uses.
Models load on first use, or at start in the background with --preload; the page comes up
at once either way, and the terminal, the page and /readyz show each load's progress
(docs/first-run.md). Every flag defaults to its environment variable (docs/configuration.md).
"""

import argparse
import dataclasses
import logging
import sys

import uvicorn

from api.limits import WS_MAX_SIZE
from moshi_core.cli.main import MODEL_SOURCE_HELP, QUANTIZE_HELP
from moshi_core.errors import InvalidParameterError
from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE
from moshi_core.params import DTYPE_NAMES, QUANTIZE_MODES
from workers.settings import PRELOAD_NAMES, Settings, mimi_for, parse_preload, read_variable

DEFAULT_PORT = 7860  # Gradio's, where a Hugging Face Space expects the app


def build_parser(env: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve the Moshi web app: the Gradio UI, the live chat and the "
                                                 "REST API on one FastAPI server.")
    add = parser.add_argument
    add("--model", default=env.default_model, metavar="SOURCE",
        help=f"Moshi model for dialogue: {MODEL_SOURCE_HELP} (env MOSHI_MODEL; default: %(default)s)")
    add("--dtype", default=env.dtype, choices=DTYPE_NAMES,
        help="LM weights and compute (env MOSHI_DTYPE; default: %(default)s)")
    add("--quantize", default=env.quantize, choices=QUANTIZE_MODES,
        help=f"{QUANTIZE_HELP}; for Moshi, STT and TTS alike (env MOSHI_QUANTIZE; default: %(default)s)")
    named_mimi = read_variable("MOSHI_MIMI")  # None when unset: then `mimi_for`'s rule, on --model
    own_mimi = f"the Mimi file of a local --model folder when it holds one, else {DEFAULT_MIMI_SOURCE}"
    add("--mimi", default=named_mimi, metavar="SOURCE",
        help=f"Mimi weights: {MODEL_SOURCE_HELP} (env MOSHI_MIMI; default: {named_mimi or own_mimi})")
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
    add("--preload", type=_preload, default=env.preload, metavar="MODELS",
        help=f"load these models at start, in the background: none, all, or some of {','.join(PRELOAD_NAMES)} "
             "(env MOSHI_PRELOAD; default: each on first use)")
    return parser


def _preload(text: str) -> tuple[str, ...]:
    try:
        return parse_preload(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use none, all, or a comma-separated list of "
                                         f"{', '.join(PRELOAD_NAMES)}") from None


def serving_settings(env: Settings, args: argparse.Namespace) -> Settings:
    """The environment's settings with the flags'; Mimi from --mimi (or MOSHI_MIMI), else from
    the --model folder when it holds one: a local model's codec, not the Hub's."""
    return dataclasses.replace(
        env, models=tuple(dict.fromkeys([args.model, *env.models[1:]])), mimi=mimi_for(args.model, args.mimi),
        device=args.device, dtype=args.dtype, quantize=args.quantize, host=args.host, port=args.port,
        live_slots=args.live_slots, live_max_seconds=args.live_max_seconds, preload=args.preload)


def main(argv: list[str] | None = None) -> None:
    try:
        env = Settings.from_env()
    except InvalidParameterError as exc:  # a bad variable: its one line, not a traceback
        print(f"app.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    settings = serving_settings(env, build_parser(env).parse_args(argv))
    loads = f"loading {', '.join(settings.preload)} now" if settings.preload else "models load on first use"
    print(f"Moshi app on http://{settings.host}:{settings.port} (Moshi from {settings.default_model}, Mimi from "
          f"{settings.mimi}; {loads})", flush=True)
    # Our own lines (a model's load stages and download progress, jobs) in the terminal; not
    # the libraries' (uvicorn's stay at warning, below).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("moshi").addHandler(handler)
    logging.getLogger("moshi").setLevel(logging.INFO)
    from ui.app import create_app  # after the arguments: --help and a bad flag answer without loading torch

    # Open streams (a Gradio client, a websocket) must not keep a stopping server up forever.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=5, ws_max_size=WS_MAX_SIZE)


if __name__ == "__main__":
    main()
