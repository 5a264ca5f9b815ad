"""Moshi LM streaming step, ours vs Kyutai's reference (`moshi==0.2.13`), in one run.

    python bench/lm_bench.py [--config reduced|full] [--dtype bfloat16] [--steps 30]

`reduced` is Moshi 7B's exact shape with 4 temporal layers instead of 32 (1.8 B parameters);
`full` is the 7B (15.4 GB in bfloat16; each side runs in its own process, one after the
other). Both sides get random weights of the same shapes and dtype (timing does not depend
on the values) and the same user codes; the greedy step (temporal transformer + 8 depth
steps) is timed. Beside each figure: the memory-bandwidth
bound, i.e. the bytes of weights a step must read divided by this machine's measured
read bandwidth for matrix-vector products.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


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


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes read per step: every weight but the embedding tables (only one row each is read),
    8-bit ones as their int8 values and float16 scales."""
    from moshi_core.q8 import Q8Weight

    total = 0
    for name, p in model.named_parameters():
        if "emb" not in name:
            total += p.numel() * p.element_size()
    for name, module in model.named_modules():
        if "emb" not in name:
            for w in vars(module).values():
                if isinstance(w, Q8Weight):
                    total += w.qs.numel() + w.scales.numel() * w.scales.element_size()
    return total


def gemv_bandwidth(dtype: torch.dtype = torch.float32) -> float:
    """Bytes/s of x @ W.T for a cold 1 GB of weights, the access pattern of one decode step.
    float32 is the default: it is the dtype this machine's GEMV streams fastest (without native
    bfloat16 instructions a bfloat16 GEMV is compute-bound), so bytes / this is the bound."""
    weights = [torch.randn(4096, 4096).to(dtype) for _ in range(32)]
    x = torch.randn(1, 4096).to(dtype)
    for w in weights:
        x @ w.T
    start = time.perf_counter()
    for _ in range(3):
        for w in weights:
            x @ w.T
    elapsed = (time.perf_counter() - start) / 3
    return sum(w.numel() * w.element_size() for w in weights) / elapsed


def quantized_copy(model: torch.nn.Module, config, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with every matrix whose rows are whole 32-blocks in Q8_0 (int8 kept), as Candle's
    q8 GGUF stores them, loaded through the same code as a checkpoint."""
    from moshi_core.checkpoints import materialize
    from moshi_core.lm import LMModel
    from moshi_core.q8 import Q8_BLOCK, Q8Tensor

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
    return materialize(empty, state, "q8", dtype, "cpu")


def run_side(side: str, config: str, dtype_name: str, steps: int, batch: int = 1) -> dict:
    """One side's step times; `side` is ours, q8 (ours, Q8_0 weights kept int8) or reference."""
    dtype = getattr(torch, dtype_name)
    kwargs = lm_kwargs(config)
    user = torch.randint(0, 2048, (steps + 5, batch, 8, 1), generator=torch.Generator().manual_seed(0))
    if side in ("ours", "q8"):
        from moshi_core.generate import LMGenerator
        from moshi_core.lm import LMConfig, LMModel
        from moshi_core.sampling import SamplingParams

        with torch.device("meta"):
            model = LMModel(LMConfig.from_dict(kwargs))
        model = model.to_empty(device="cpu").to(dtype).eval()
        fill_random(model)
        if side == "q8":
            model = quantized_copy(model, LMConfig.from_dict(kwargs), dtype)
        gen = LMGenerator(model, SamplingParams.greedy())
        state = gen.init_state(batch)

        def step(codes):
            return gen.step(codes, state)
    else:
        from moshi.models.lm import LMGen, LMModel

        with torch.device("meta"):
            model = LMModel(**kwargs)
        model = model.to_empty(device="cpu").to(dtype).eval()
        fill_random(model)
        gen = LMGen(model, use_sampling=False)
        gen.streaming_forever(batch)

        def step(codes):
            return gen.step(codes)
    times = []
    with torch.no_grad():
        for t in range(steps + 5):
            start = time.perf_counter()
            step(user[t])
            times.append(time.perf_counter() - start)
    return summarize(times[5:], step_bytes(model))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["reduced", "full"], default="reduced")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", choices=["ours", "q8", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: one side, result as JSON
        print(json.dumps(run_side(args.side, args.config, args.dtype, args.steps, args.batch)))
        return
    results = {}
    for side in ("ours", "reference"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--config", args.config, "--dtype", args.dtype,
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    bandwidth = gemv_bandwidth()
    bound = results["ours"]["bytes"] / bandwidth
    print(f"Moshi LM step ({args.config} config, {args.dtype}, greedy, batch 1), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"weights read per step {results['ours']['bytes'] / 1e9:.2f} GB, "
          f"measured GEMV bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| measure | ours | reference | speed-up | bandwidth bound |")
    print("|---|---:|---:|---:|---:|")
    for q in ("p50", "p95"):
        mine, theirs = results["ours"][q] * 1000, results["reference"][q] * 1000
        print(f"| step {q} (ms) | {mine:.0f} | {theirs:.0f} | {theirs / mine:.2f}x | {bound * 1000:.0f} |")


if __name__ == "__main__":
    main()
