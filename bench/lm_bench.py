"""Moshi LM streaming step, ours vs Kyutai's reference (`moshi==0.2.13`), in one run.

    python bench/lm_bench.py [--config reduced|full] [--dtype bfloat16] [--steps 30]

`reduced` is Moshi 7B's exact shape with 4 temporal layers instead of 32 (1.8 B parameters);
`full` is the 7B (15.4 GB in bfloat16; each side runs in its own process, one after the
other). Both sides get random weights of the same shapes and dtype (timing does not depend
on the values) and the same user codes; the greedy step (temporal transformer + 8 depth
steps) is timed. Beside each figure: the memory-bandwidth bound, i.e. the bytes of weights a
step must read divided by this machine's read bandwidth (`bench/bandwidth.py`: a plain
streaming read, measured before and after the run; the larger is used).

A child run (`--side`) measures one configuration and prints JSON; `bench/run_all.py` and
`bench/q8_bench.py` drive them:
- `--side ours|q8|reference`: our float model, ours with Q8_0 weights kept int8 (`--gguf` loads
  a file through the user's code path; else the float weights are quantized in memory), or
  Kyutai's `LMGen`;
- `--batch N`: N conversations stepped together;
- `--window full`: every conversation is 3000 steps in (the KV cache full), the cost a long
  conversation pays each step; the default, `start`, is a conversation's first steps.
- `--device cuda`: on a GPU (`--realtime` then also counts how many conversations one step
  carries within 80 ms at p95).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from bandwidth import read_bandwidth  # noqa: E402
from child import run_child  # noqa: E402
from machine import machine_line  # noqa: E402
from reads import step_bytes  # noqa: E402

FRAME_SECONDS = 0.08


def lm_kwargs(config: str) -> dict:
    from moshi.models import loaders

    kwargs = dict(loaders._lm_kwargs)
    if config == "reduced":
        kwargs["num_layers"] = 4
    return kwargs


def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights (std 1/sqrt(fan_in); norms at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            chunk = torch.empty(p.shape, dtype=torch.float32)
            p.copy_(chunk.normal_(0, p.shape[-1] ** -0.5, generator=g) if p.dim() > 1 else chunk.fill_(1.0))


def cache_bytes(kwargs: dict, batch: int, window: str, dtype: torch.dtype) -> int:
    """Bytes of the temporal KV cache a step must read: none at a conversation's start, every
    entry (keys and values of `context` steps in every layer) when the window is full."""
    if window == "start":
        return 0
    return kwargs["num_layers"] * 2 * batch * kwargs["context"] * kwargs["dim"] * dtype.itemsize


def quantized_copy(model: torch.nn.Module, config, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """`model` with every matrix whose rows are whole 32-blocks in Q8_0 (int8 kept), as Candle's
    q8 GGUF stores them, loaded through the same code as a checkpoint."""
    from moshi_core.kernels.q8 import Q8_BLOCK, Q8Tensor
    from moshi_core.loading.checkpoints import materialize
    from moshi_core.models.lm import LMModel

    state = {}
    for name, value in model.state_dict().items():
        if value.dim() == 2 and value.shape[1] % Q8_BLOCK == 0:
            blocks = value.float().reshape(value.shape[0], -1, Q8_BLOCK)
            scale = (blocks.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
            qs = (blocks / scale).round().to(torch.int8).reshape(value.shape)
            state[name] = Q8Tensor(qs, scale.squeeze(-1).half())
        else:
            state[name] = value
    with torch.device("meta"):
        empty = LMModel(config)
    return materialize(empty, state, "q8", dtype, device)


def _ours(side: str, kwargs: dict, dtype: torch.dtype, device: str, gguf: str | None):
    from moshi_core.loading.checkpoints import load_lm
    from moshi_core.models.lm import LMConfig, LMModel

    config = LMConfig.from_dict(kwargs)
    if gguf:
        return load_lm(gguf, config, dtype=dtype, device=device)
    with torch.device("meta"):
        model = LMModel(config)
    model = model.to_empty(device="cpu").to(dtype).eval()
    fill_random(model)
    if side == "q8":
        return quantized_copy(model, config, dtype, device)
    return model.to(device)


def _fill_window(cache) -> None:
    """Make every conversation of a KV cache 3000 steps old: all entries valid."""
    capacity = cache.positions.shape[1]
    cache.positions.copy_(torch.arange(capacity, device=cache.positions.device).expand_as(cache.positions))
    cache.offset.fill_(capacity)


def _timed_steps(step, user: torch.Tensor, sync) -> list[float]:
    times = []
    with torch.no_grad():
        for t in range(user.shape[0]):
            start = time.perf_counter()
            step(user[t])
            sync()
            times.append(time.perf_counter() - start)
    return times[5:]  # the first steps pay for lazy initialisation (and compilation on GPUs)


def run_side(side: str, config: str, dtype_name: str, steps: int, batch: int = 1, window: str = "start",
             device: str = "cpu", gguf: str | None = None, realtime: bool = False) -> dict:
    """One configuration's step times (and memory): see the module's docstring."""
    dtype = getattr(torch, dtype_name)
    kwargs = lm_kwargs(config)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if side in ("ours", "q8"):
        from moshi_core.inference.generate import LMGenerator
        from moshi_core.params import SamplingParams

        start = time.perf_counter()
        model = _ours(side, kwargs, dtype, device, gguf)
        load_seconds = time.perf_counter() - start
        rss_model = resident_bytes()
        gen = LMGenerator(model, SamplingParams.greedy())

        def make(n: int):
            state = gen.init_state(n)
            if window == "full":
                _fill_window(state.lm)
            return lambda codes: gen.step(codes, state)
    else:
        from moshi.models.lm import LMGen, LMModel

        with torch.device("meta"):
            model = LMModel(**kwargs)
        model = model.to_empty(device="cpu").to(dtype).eval()
        fill_random(model)
        model = model.to(device)
        load_seconds, rss_model = None, resident_bytes()

        def make(n: int):  # its attention reads every cache entry at any age: `window` changes nothing
            gen = LMGen(model, use_sampling=False)
            gen.streaming_forever(n)
            return gen.step

    def measure(n: int) -> dict:
        step = make(n)
        user = torch.randint(0, 2048, (steps + 5, n, 8, 1), generator=torch.Generator().manual_seed(0)).to(device)
        times = _timed_steps(step, user, sync)
        return summarize(times, step_bytes(model) + cache_bytes(kwargs, n, window, dtype))

    result = measure(batch)
    result.update(rss_model=rss_model, load_seconds=load_seconds, batch=batch, window=window)
    if device.startswith("cuda"):
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    if realtime:
        result["realtime"] = realtime_sweep(measure)
    return result


def realtime_sweep(measure) -> dict:
    """p95 of a step of N conversations for N = 1, 2, 4, ...; the largest N within 80 ms."""
    sweep, n = {}, 1
    while n <= 256:
        p95 = measure(n)["p95"]
        sweep[n] = p95
        if p95 > FRAME_SECONDS:
            break
        n *= 2
    within = [n for n, p95 in sweep.items() if p95 <= FRAME_SECONDS]
    return {"p95_by_conversations": sweep, "max_realtime": max(within) if within else 0}


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), after a garbage collection."""
    import gc

    gc.collect()
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def summarize(times: list[float], read_bytes: int) -> dict:
    times = sorted(times)
    return {"p50": times[len(times) // 2], "p95": times[int(0.95 * (len(times) - 1))], "bytes": read_bytes,
            "rss": resident_bytes()}


def child(*args: str) -> dict:
    """One measurement (`--side ...`) in a process of its own."""
    return run_child(Path(__file__), *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["reduced", "full"], default="reduced")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", choices=["ours", "q8", "reference"], help="measure one side (prints JSON)")
    parser.add_argument("--batch", type=int, default=1, help="conversations stepped together (default: 1)")
    parser.add_argument("--window", choices=["start", "full"], default="start")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gguf", help="with --side q8: a model.q8.gguf to load")
    parser.add_argument("--realtime", action="store_true", help="with --device cuda: the real-time sweep")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.config, args.dtype, args.steps, args.batch, args.window,
                                  args.device, args.gguf, args.realtime)))
        return
    common = ("--config", args.config, "--dtype", args.dtype, "--steps", str(args.steps))
    before = read_bandwidth()
    results = {side: child("--side", side, *common) for side in ("ours", "reference")}
    after = read_bandwidth()
    bandwidth = max(before.bytes_per_second, after.bytes_per_second)
    bound = results["ours"]["bytes"] / bandwidth
    print(f"Moshi LM step ({args.config} config, {args.dtype}, greedy, batch 1); {machine_line()}\n"
          f"weights read per step {results['ours']['bytes'] / 1e9:.2f} GB; read bandwidth {before} before, "
          f"{after} after (the bound uses the larger)\n")
    print("| measure | ours | reference | speed-up | bandwidth bound |")
    print("|---|---:|---:|---:|---:|")
    for q in ("p50", "p95"):
        mine, theirs = results["ours"][q] * 1000, results["reference"][q] * 1000
        print(f"| step {q} (ms) | {mine:.0f} | {theirs:.0f} | {theirs / mine:.2f}x | {bound * 1000:.0f} |")


if __name__ == "__main__":
    main()
