"""Live conversation: per-frame server time and the latency the serving path adds to it.

    python bench/live_bench.py [--slots 1] [--active N] [--steps 200]

On the tiny test config (a 7B-shaped LM with 64-wide layers, the full-size Mimi, random
weights, float32, CPU): times Mimi encode, the LM step and Mimi decode of one batched step
of `--active` conversations (default: every slot) on an engine of `--slots` slots, then
serves `/api/chat` (PCM variant) from an engine of `--slots` slots to one client and
measures the round trip of a frame: sent by the client -> the answering frame received.
The round trip minus the server's step time for one conversation is what the path adds
(websocket, PCM conversion, the event loop, the worker thread hop).
"""

import argparse
import asyncio
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]


class _NoText:
    """Stands for the tokenizer: the benchmark does not read Moshi's text."""

    def piece(self, token: int) -> None:
        return None


def tiny_models():
    from oracle import REDUCED_7B

    from moshi_core.loading.registry import MoshiModels
    from moshi_core.models.lm import LMConfig, LMModel
    from moshi_core.models.mimi import MimiModel

    torch.manual_seed(0)
    lm = LMModel(LMConfig.from_dict(dict(REDUCED_7B, text_card=64, card=2048))).eval()
    mimi = MimiModel().eval()
    mimi.num_codebooks = 8
    return MoshiModels(lm, mimi, _NoText(), "tiny")


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def time_steps(models, slots: int, active: int, steps: int) -> dict[str, list[float]]:
    """The parts of an engine step with `active` of its `slots` conversations in progress,
    stepped as `LiveEngine.step` steps them (the others' rows left alone)."""
    from moshi_core.engines.live import LiveEngine

    engine = LiveEngine(models, slots=slots)
    for _ in range(active):
        engine.open(seed=0)
    mimi, gen = models.mimi, engine.generator
    lm_state, mimi_state = engine._lm_state, engine._mimi_state
    rows = None if active == slots else torch.arange(active)
    wav = torch.randn(active, 1, 1920) * 0.1
    times: dict[str, list[float]] = {"encode": [], "lm": [], "decode": [], "total": []}
    with torch.inference_mode():
        for t in range(steps + 10):
            t0 = time.perf_counter()
            codes = mimi.encode_step(wav, mimi_state, 8, rows)
            t1 = time.perf_counter()
            out = gen.step(codes, lm_state, rows)
            t2 = time.perf_counter()
            mimi.decode_step(out[:, 1:, None].clamp(min=0), mimi_state, rows)
            t3 = time.perf_counter()
            if t >= 10:  # after warm-up
                for name, dt in (("encode", t1 - t0), ("lm", t2 - t1), ("decode", t3 - t2), ("total", t3 - t0)):
                    times[name].append(dt)
    return times


def serve(models, slots: int) -> str:
    import uvicorn
    from fastapi import FastAPI

    from api.chat import create_chat_router
    from api.live_driver import LiveDriver
    from moshi_core.engines.live import LiveEngine

    app = FastAPI()
    app.include_router(create_chat_router(LiveDriver(lambda: LiveEngine(models, slots=slots)), max_seconds=3600))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"ws://127.0.0.1:{port}/api/chat"


async def round_trips(url: str, steps: int) -> list[float]:
    """Seconds from sending frame k + 1 to receiving Moshi's answering frame k, in lock step
    (the next frame goes at the next 80 ms tick or when the answer is in, whichever is later)
    so that no backlog builds up and the figure is the path's own, not queueing."""
    import websockets

    from api.chat import PcmCodec

    codec = PcmCodec()
    trips: list[float] = []
    async with websockets.connect(f"{url}?codec=pcm&seed=0") as ws:
        await ws.recv()  # handshake
        for k in range(steps + 1):
            tick = time.perf_counter()
            await ws.send(b"\x01" + codec.encode(np.random.randn(1920).astype(np.float32) * 0.1))
            if k == 0:
                continue  # the first frame only primes the model: no answer
            while (await ws.recv())[0] != 1:
                pass  # text
            trips.append(time.perf_counter() - tick)
            await asyncio.sleep(max(0.0, tick + 0.08 - time.perf_counter()))
    return trips[10:]  # after warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=1, help="the engine's slots (default: 1)")
    parser.add_argument("--active", type=int, help="conversations in progress for the step times (default: --slots)")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    active = args.active or args.slots
    if not 1 <= active <= args.slots:
        parser.error("--active must be between 1 and --slots")
    torch.set_grad_enabled(False)
    models = tiny_models()
    times = time_steps(models, args.slots, active, args.steps)
    print(f"per-frame server time, tiny config, {active} of {args.slots} slot(s) in progress, {args.steps} steps, "
          f"{torch.get_num_threads()} threads:")
    for name, values in times.items():
        print(f"  {name:7s} p50 {pct(values, 50):6.1f} ms   p95 {pct(values, 95):6.1f} ms")
    lone = times if active == 1 else time_steps(models, args.slots, 1, args.steps)
    trips = asyncio.run(round_trips(serve(models, args.slots), args.steps))
    compute = statistics.median(lone["total"]) * 1000
    print(f"one client on {args.slots} slot(s): server step p50 {compute:.1f} ms; round trip of a frame over "
          f"/api/chat (PCM, lock step, {len(trips)} frames): p50 {pct(trips, 50):.1f} ms, p95 {pct(trips, 95):.1f} ms; "
          f"added beyond compute (p50 round trip - p50 step): {pct(trips, 50) - compute:.1f} ms")

if __name__ == "__main__":
    main()
