"""Every benchmark in one run, one table: ours beside Kyutai's reference (`moshi==0.2.13`),
the ratio, the memory-bandwidth bound beside each figure, and the goal it is held to.

    python bench/run_all.py [--quick] [--steps 20] [--threads N]     (make bench)

Rows: Mimi (offline and streaming, float32); the Moshi LM step at the reduced config (7B
shape, 4 temporal layers) in bfloat16 (ours and the reference) and with Q8_0 weights kept
int8, one conversation and four batched; unless `--quick`, the full 7B from a generated
8.2 GB q8 GGUF (one conversation at its start and 3000 steps in, four batched) and in
bfloat16 (ours and the reference; ~16 GB of memory each; about 11 minutes in all on 2
cores); on a machine with CUDA, the 7B on the GPU and how many conversations stay real time.
Each measurement runs in its own process, one after the other. "Bound" is the bytes a step
must read (weights, plus the KV cache when full) divided by the read bandwidth measured in
the same run (the larger of its start and its end); "/ bound" is how far a figure is from
it. The machine's load average is printed before and after: on a shared machine, figures
taken under load are slower and noisier. The figures are also written to
bench/results/latest.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from lm_bench import child as lm_child  # noqa: E402
from lm_bench import read_bandwidth  # noqa: E402
from q8_bench import run_full  # noqa: E402


def mimi_child() -> dict:
    out = subprocess.run([sys.executable, str(BENCH / "mimi_bench.py"), "--json"], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"mimi_bench.py failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float | None, float | None, str]] = []

    def add(self, measure: str, ours: float, reference: float | None = None, read_bytes: float | None = None,
            goal: str = "") -> None:
        self.rows.append((measure, ours, reference, read_bytes, goal))

    def step(self, label: str, r: dict, reference: dict | None = None, goal: str = "") -> None:
        """p50 and p95 rows of a step measurement (seconds in, milliseconds shown)."""
        for q in ("p50", "p95"):
            self.add(f"{label}, {q} (ms)", r[q] * 1000, reference[q] * 1000 if reference else None, r["bytes"],
                     goal if q == "p50" else "")

    def print(self, bandwidth: float) -> None:
        print("| measure | ours | reference | speed-up | bound | ours / bound | goal |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for measure, mine, theirs, read, goal in self.rows:
            is_ms = "(ms)" in measure
            bound = read / bandwidth * (1000 if is_ms else 1) if read else None
            cells = [f"{mine:.3g}", f"{theirs:.3g}" if theirs else "—", f"{theirs / mine:.2f}x" if theirs else "—",
                     f"{bound:.3g}" if bound else "—", f"{mine / bound:.2f}" if bound else "—", goal]
            print(f"| {measure} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the full-size 7B (about 15 minutes)")
    parser.add_argument("--steps", type=int, default=20, help="LM steps timed per configuration (default: 20)")
    parser.add_argument("--threads", type=int, help="torch threads in every benchmark (default: torch's choice)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the 8.2 GB GGUF is written")
    args = parser.parse_args()
    if args.threads:  # read by torch at start-up in every child process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    start_load = load()
    start_bandwidth = read_bandwidth()
    steps = ("--steps", str(args.steps))
    results: dict = {"mimi": mimi_child()}

    def lm(side: str, *extra: str) -> dict:
        return lm_child("--side", side, "--config", "reduced", *steps, *extra)

    results["reduced"] = reduced = {
        "bf16": lm("ours"), "reference": lm("reference"), "q8": lm("q8"), "q8 x4": lm("q8", "--batch", "4"),
        "q8 full": lm("q8", "--window", "full"), "q8 x4 full": lm("q8", "--batch", "4", "--window", "full"),
    }
    configs = ["q8", "q8-full", "q8-x4", "q8-x4-full", "bf16", "reference"]
    results["full"] = full = {} if args.quick else run_full(configs, args.steps, Path(args.workdir))
    if torch.cuda.is_available() and not args.quick:
        results["gpu"] = run_full(["q8", "bf16"], args.steps, Path(args.workdir), device="cuda", extra=("--realtime",))
    # The best of the start and the end: a shared machine's speed moves during a run, and the
    # bound is the hardware's.
    end_bandwidth = read_bandwidth()
    bandwidth = max(start_bandwidth, end_bandwidth)
    results["read_bandwidth"] = {"start": start_bandwidth, "end": end_bandwidth}

    table = Table()
    mimi = results["mimi"]
    for label, mine, theirs in mimi["rows"]:
        streaming = "per 80 ms frame" in label
        goal = "≤ 20 ms" if streaming and "p50" in label else "1.5x" if "offline" in label else ""
        table.add(f"Mimi {label}", mine, theirs, mimi["bytes"] if streaming else None, goal)
    table.step("LM step, reduced config, bf16", reduced["bf16"], reduced["reference"])
    table.step("LM step, reduced config, q8 (int8 kept)", reduced["q8"])
    for name, one, four in (("at a conversation's start", "q8", "q8 x4"), ("3000 steps in", "q8 full", "q8 x4 full")):
        table.add(f"LM step, reduced q8, {name}: 4 batched conversations / 1 (p50)",
                  reduced[four]["p50"] / reduced[one]["p50"], goal="≤ 1.3x")
    if full:
        q8, ref = full["q8 (int8 kept), ours"], full["bf16, reference"]
        table.step("LM step, 7B, q8 (int8 kept), ours", q8, goal="≤ 350 ms")
        table.step("LM step, 7B, q8, 3000 steps in (full KV cache)", full["q8, ours, full 3000-step window"])
        table.add("7B q8: resident memory after load (GB)", q8["rss_model"] / 1e9, goal="≤ 9.5 GB")
        table.add("7B q8: resident, one conversation 3000 steps in (GB)",
                  full["q8, ours, full 3000-step window"]["rss"] / 1e9)
        for name, one, four in (("at the start", "q8 (int8 kept), ours", "q8, ours, 4 conversations"),
                                ("3000 steps in", "q8, ours, full 3000-step window",
                                 "q8, ours, 4 conversations, full window")):
            table.add(f"LM step, 7B q8, {name}: 4 batched conversations / 1 (p50)",
                      full[four]["p50"] / full[one]["p50"], goal="≤ 1.3x")
        table.step("LM step, 7B, bf16", full["bf16, ours"], ref, goal="≤ 800 ms")
    for name, r in results.get("gpu", {}).items():
        table.step(f"GPU: LM step, 7B, {name}", r)
        table.add(f"GPU: 7B {name}: conversations in one step within 80 ms at p95", r["realtime"]["max_realtime"],
                  goal="≥ 16 (H100)")

    print(f"moshi-core benchmarks: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; read bandwidth "
          f"{start_bandwidth / 1e9:.1f} GB/s at the start, {end_bandwidth / 1e9:.1f} GB/s at the end (the bound uses "
          f"the larger); load average {start_load} at the start, {load()} at the end\n")
    table.print(bandwidth)
    if "gpu" not in results:
        print("\nGPU: not measured (no CUDA device here).")
    out = BENCH / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
