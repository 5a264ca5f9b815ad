"""The 7B Moshi LM in 8 bits: Kyutai's Candle q8 GGUF kept int8 (ours) vs bfloat16 (ours and
the reference `moshi==0.2.13`), step time and resident memory, in one run.

    python bench/q8_bench.py [--steps 10] [--workdir /tmp] [--keep]

A full-size `model.q8.gguf` (8.2 GB, Candle's names and types, random Q8_0 blocks) is
generated first, in `--workdir`, and deleted at the end unless `--keep`: it is loaded through
the same code as a user's download. Each configuration runs in its own process, one after
the other (the machine holds one 7B at a time). "Bound" is the bytes of weights a step reads
divided by the GEMV bandwidth measured on this machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from lm_bench import gemv_bandwidth, resident_bytes, step_bytes, summarize  # noqa: E402


def write_full_gguf(path: Path) -> None:
    """Random Q8_0 blocks for every 2-D tensor whose rows are whole blocks, F32 ones else."""
    import gguf

    from moshi_core.lm import MOSHI_7B, LMConfig, LMModel
    from oracle import candle_state_dict, official_state_dict

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


def run_q8(path: Path, steps: int) -> dict:
    from moshi_core.checkpoints import load_lm
    from moshi_core.generate import LMGenerator
    from moshi_core.lm import MOSHI_7B, LMConfig
    from moshi_core.sampling import SamplingParams

    start = time.perf_counter()
    model = load_lm(path, LMConfig.from_dict(MOSHI_7B), dtype=torch.bfloat16)
    load_seconds = time.perf_counter() - start
    rss_model = resident_bytes()
    read = step_bytes(model)
    gen = LMGenerator(model, SamplingParams.greedy())
    state = gen.init_state(1)
    user = torch.randint(0, 2048, (steps + 3, 1, 8, 1), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for t in range(steps + 3):
            t0 = time.perf_counter()
            gen.step(user[t], state)
            times.append(time.perf_counter() - t0)
    result = summarize(times[3:], read)
    result.update(rss_model=rss_model, load_seconds=load_seconds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the generated GGUF")
    parser.add_argument("--configs", default="q8,bf16,reference",
                        help="which of q8, bf16 (ours) and reference to run (default: all three)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (for bench/run_all.py)")
    parser.add_argument("--q8-only", metavar="GGUF", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = args.configs.split(",")
    if args.q8_only:
        print(json.dumps(run_q8(Path(args.q8_only), args.steps)))
        return
    path = Path(args.workdir) / "moshi-bench-model.q8.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        write_full_gguf(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    try:
        def child(*extra: str) -> dict:
            out = subprocess.run([sys.executable, *extra], capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        lm_bench = str(ROOT / "bench" / "lm_bench.py")
        runs = {
            "q8": ("q8, ours", (__file__, "--q8-only", str(path))),
            "bf16": ("bf16, ours", (lm_bench, "--side", "ours", "--config", "full")),
            "reference": ("bf16, reference", (lm_bench, "--side", "reference", "--config", "full")),
        }
        results = {runs[c][0]: child(*runs[c][1], "--steps", str(args.steps)) for c in configs}
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(results))
        return
    bandwidth = gemv_bandwidth()
    print(f"Moshi 7B LM step (greedy, batch 1), {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"measured GEMV bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| configuration | weights read per step | step p50 | step p95 | bound | p50 / bound | resident memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        bound = r["bytes"] / bandwidth
        rss = r.get("rss_model", r["rss"])
        print(f"| {name} | {r['bytes'] / 1e9:.2f} GB | {r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms | "
              f"{bound * 1000:.0f} ms | {r['p50'] / bound:.2f} | {rss / 1e9:.1f} GB |")
    q8 = results.get("q8, ours")
    if q8:
        print(f"\nq8: model resident after load {q8['rss_model'] / 1e9:.2f} GB (weights + process), "
              f"with a conversation's KV cache {q8['rss'] / 1e9:.2f} GB; load {q8['load_seconds']:.0f} s")


if __name__ == "__main__":
    main()
