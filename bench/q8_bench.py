"""The 7B Moshi LM: Kyutai's Candle q8 GGUF kept int8 (ours) and bfloat16 (ours and the
reference `moshi==0.2.13`), step time and resident memory, in one run.

    python bench/q8_bench.py [--steps 10] [--workdir /tmp] [--keep] [--configs q8,q8-full,...]

A full-size `model.q8.gguf` (8.2 GB, Candle's names and types, random Q8_0 blocks) is
generated first, in `--workdir`, and deleted at the end unless `--keep`: it is loaded through
the same code as a user's download. Each configuration runs in its own process, one after
the other (the machine holds one 7B at a time):

- q8: one conversation at its start; q8-full: one conversation 3000 steps in (a full KV
  cache read every step); q8-x4 / q8-x4-full: four conversations batched;
- bf16: ours in bfloat16; reference: Kyutai's `LMGen` in bfloat16.

"Bound" is the bytes a step must read (weights, and the KV cache when full) divided by the
read bandwidth (`bench/bandwidth.py`), measured before and after the run: the larger is used.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from bandwidth import read_bandwidth  # noqa: E402
from lm_bench import child  # noqa: E402
from machine import machine_line  # noqa: E402

CONFIGS = {  # name: (label, lm_bench arguments)
    "q8": ("q8 (int8 kept), ours", ("--side", "q8")),
    "q8-full": ("q8, ours, full 3000-step window", ("--side", "q8", "--window", "full")),
    "q8-x4": ("q8, ours, 4 conversations", ("--side", "q8", "--batch", "4")),
    "q8-x4-full": ("q8, ours, 4 conversations, full window", ("--side", "q8", "--batch", "4", "--window", "full")),
    "bf16": ("bf16, ours", ("--side", "ours")),
    "reference": ("bf16, reference", ("--side", "reference")),
}


def write_full_gguf(path: Path) -> None:
    """Random Q8_0 blocks for every 2-D tensor whose rows are whole blocks, F32 ones else."""
    import gguf
    from oracle import candle_state_dict, official_state_dict

    from moshi_core.models.lm import MOSHI_7B, LMConfig, LMModel

    with torch.device("meta"):
        model = LMModel(LMConfig.from_dict(MOSHI_7B))
    shapes = {k: tuple(v.shape) for k, v in candle_state_dict(official_state_dict(model), 8).items()}
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "moshi")
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, shape in sorted(shapes.items()):
        if len(shape) == 2 and shape[1] % 32 == 0:
            byte_shape = (shape[0], shape[1] // 32 * 34)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=q8)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in sorted(shapes.items()):
        if len(shape) == 2 and shape[1] % 32 == 0:
            rows, blocks = shape[0], shape[1] // 32
            data = rng.integers(-127, 128, (rows, blocks, 34), dtype=np.int8).view(np.uint8)
            # A scale that gives weights of std ~ 1/sqrt(fan_in), like a trained layer.
            scale = np.float16(1 / (73 * np.sqrt(shape[1])))
            data[..., :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
            writer.write_tensor_data(data.reshape(rows, blocks * 34))
        else:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
    writer.close()


def run_full(configs: list[str], steps: int, workdir: Path, keep: bool = False, device: str = "cpu",
             extra: tuple[str, ...] = ()) -> dict:
    """{label: result} of each configuration, each in a process of its own (`extra`: more
    lm_bench arguments for every one)."""
    path = workdir / "moshi-bench-model.q8.gguf"
    if any(c.startswith("q8") for c in configs) and not path.exists():
        start = time.perf_counter()
        write_full_gguf(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    try:
        results = {}
        for name in configs:
            label, args = CONFIGS[name]
            gguf = ("--gguf", str(path)) if name.startswith("q8") else ()
            results[label] = child(*args, "--config", "full", "--steps", str(steps), "--device", device, *gguf, *extra)
        return results
    finally:
        if not keep:
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the generated GGUF")
    parser.add_argument("--configs", default="q8,q8-full,bf16,reference",
                        help=f"which of {', '.join(CONFIGS)} to run (default: %(default)s)")
    args = parser.parse_args()
    before = read_bandwidth()
    results = run_full(args.configs.split(","), args.steps, Path(args.workdir), args.keep)
    after = read_bandwidth()
    bandwidth = max(before.bytes_per_second, after.bytes_per_second)
    print(f"Moshi 7B LM step (greedy); {machine_line()}\nread bandwidth {before} before, {after} after "
          "(the bound uses the larger)\n")
    print("| configuration | bytes read per step | step p50 | step p95 | bound | p50 / bound | resident memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        bound = r["bytes"] / bandwidth
        print(f"| {name} | {r['bytes'] / 1e9:.2f} GB | {r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms | "
              f"{bound * 1000:.0f} ms | {r['p50'] / bound:.2f} | {r['rss'] / 1e9:.1f} GB |")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
