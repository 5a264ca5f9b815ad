"""Every benchmark in one run, one table: ours beside Kyutai's reference (`moshi==0.2.13`),
the ratio, and the memory-bandwidth bound beside each figure.

    python bench/run_all.py [--quick] [--steps 20] [--threads N]

Rows: Mimi (offline and streaming, float32), the Moshi LM step at the reduced config (7B
shape, 4 temporal layers) in bfloat16 and with Q8_0 weights kept int8, 4 batched slots
against one, and, unless `--quick`, the full 7B from a generated 8.2 GB q8 GGUF (about 10
minutes; bfloat16 ours and reference need ~16 GB of memory each). Each measurement runs in
its own process, one after the other. "Bound" is the bytes a step must read (weights; the
embedding tables but one row) divided by the float32 GEMV bandwidth measured at the end of
the run; "/ bound" is how far a figure is from it. Machine load (`/proc/loadavg`) is printed
before and after: on a shared machine, figures taken under load are slower and noisier.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from lm_bench import gemv_bandwidth  # noqa: E402


def child(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the full-size 7B (about 10 minutes)")
    parser.add_argument("--steps", type=int, default=20, help="LM steps timed per configuration (default: 20)")
    parser.add_argument("--threads", type=int, help="torch threads in every benchmark (default: torch's choice)")
    parser.add_argument("--full", default="q8,bf16,reference", metavar="CONFIGS",
                        help="which full-size 7B runs: q8, bf16 (ours), reference (default: all three)")
    args = parser.parse_args()
    if args.threads:  # read by torch at start-up in every child process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    start_load = load()
    steps = ("--steps", str(args.steps))

    def lm(side: str, config: str = "reduced", dtype: str = "bfloat16", batch: int = 1) -> dict:
        return child("lm_bench.py", "--side", side, "--config", config, "--dtype", dtype, "--batch", str(batch), *steps)

    mimi = child("mimi_bench.py", "--json")
    reduced = {"ours": lm("ours"), "reference": lm("reference"), "q8": lm("q8"), "q8 f32": lm("q8", dtype="float32"),
               "q8 x4": lm("q8", batch=4), "q8 f32 x4": lm("q8", dtype="float32", batch=4)}
    full = {} if args.quick else child("q8_bench.py", "--json", "--configs", args.full, *steps)
    bandwidth = gemv_bandwidth()

    rows = []  # (measure, ours, reference or None, bytes read or None)
    for label, mine, theirs in mimi["rows"]:
        streaming = "per 80 ms frame" in label
        rows.append((f"Mimi {label}", mine, theirs, mimi["bytes"] if streaming else None, "ms" in label))
    for name, key, ref in (("bf16", "ours", "reference"), ("q8 (int8 kept), bf16 compute", "q8", None),
                           ("q8 (int8 kept), float32 compute", "q8 f32", None)):
        for q in ("p50", "p95"):
            r = reduced[key]
            theirs = reduced[ref][q] * 1000 if ref else None
            rows.append((f"LM step, reduced config, {name}, {q} (ms)", r[q] * 1000, theirs, r["bytes"], True))
    for name, key in (("bf16 compute", "q8"), ("float32 compute", "q8 f32")):
        ratio = reduced[key + " x4"]["p50"] / reduced[key]["p50"]
        rows.append((f"LM step, reduced q8, {name}: 4 batched slots / 1 slot (p50)", ratio, None, None, False))
    for name, r in full.items():
        for q in ("p50", "p95"):
            theirs = full["bf16, reference"][q] * 1000 if name == "bf16, ours" and "bf16, reference" in full else None
            rows.append((f"LM step, 7B, {name}, {q} (ms)", r[q] * 1000, theirs, r["bytes"], True))
        rows.append((f"7B {name}: resident memory after load (GB)", r.get("rss_model", r["rss"]) / 1e9, None, None, False))
        if "rss_model" in r:
            rows.append((f"7B {name}: resident with a conversation's KV cache (GB)", r["rss"] / 1e9, None, None, False))

    print(f"moshi-core benchmarks: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; float32 GEMV bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; load average {start_load} at the start, {load()} at the end\n")
    print("| measure | ours | reference | speed-up | bound | ours / bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, mine, theirs, read, is_ms in rows:
        bound = read / bandwidth * (1000 if is_ms else 1) if read else None
        cells = [f"{mine:.3g}", f"{theirs:.3g}" if theirs else "—", f"{theirs / mine:.2f}x" if theirs else "—",
                 f"{bound:.3g}" if bound else "—", f"{mine / bound:.2f}" if bound else "—"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
