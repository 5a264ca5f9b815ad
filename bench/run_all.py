"""Every benchmark in one run, one table: ours beside Kyutai's reference (`moshi==0.2.13`),
the ratio, the memory-bandwidth bound beside each figure, and the goal it is held to.

    python bench/run_all.py [--quick] [--steps 20] [--threads N]     (make bench)

Rows: Mimi (offline and streaming, float32); the Moshi LM step at the reduced config (7B
shape, 4 temporal layers) in bfloat16 (ours and the reference) and with Q8_0 weights kept
int8, one conversation and four batched; unless `--quick`, the full 7B from a generated
8.2 GB q8 GGUF (one conversation at its start and 3000 steps in, four batched) and in
bfloat16 (ours and the reference; ~16 GB of memory each); speech to text at
`kyutai/stt-1b-en_fr`'s released size (live step with Mimi's encoder, streams within 80 ms,
file speed; ours in q8, bfloat16 and float32, the reference in float32); text to speech at
`kyutai/tts-1.6b-en_fr`'s (first audio, real-time factor; the same configurations); on a
machine with CUDA, the 7B on the GPU and how many conversations stay real time.
Each measurement runs in its own process, one after the other. "Bound" is the bytes a step
must read (weights, plus the KV cache when full) divided by the read bandwidth of a plain
streaming read (`bench/bandwidth.py`) measured at the start and at the end of the run (the
larger is used); "/ bound" is how far a figure is from it. The head of the table names the
CPU, the instructions that matter, torch, its threads and the kernels that ran, and the
machine's load average before and after: on a shared machine, figures taken under load are
slower and noisier. The figures are also written to bench/results/latest.json.
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import stt_bench  # noqa: E402
import tts_bench  # noqa: E402
from bandwidth import read_bandwidth  # noqa: E402
from child import run_child  # noqa: E402
from lm_bench import FRAME_SECONDS  # noqa: E402
from lm_bench import child as lm_child  # noqa: E402
from machine import describe, machine_line  # noqa: E402
from q8_bench import run_full  # noqa: E402

STT_CONFIGS = ["q8", "bfloat16", "float32", "reference-float32"]
TTS_CONFIGS = ["float32", "bfloat16", "q8", "reference-float32"]
REFERENCE = "reference-float32"  # its fastest on a CPU, and it has no 8-bit CPU path


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


@dataclass
class Row:
    measure: str
    ours: float
    reference: float | None = None
    read_bytes: float | None = None  # what a bound divides by the bandwidth
    bound_scale: float = 1.0  # bound = read_bytes / bandwidth * bound_scale, in the row's unit
    goal: str = ""
    higher_is_better: bool = False  # streams, audio seconds per second


def figure(value: float) -> str:
    """Three significant digits, without exponents for the large ones (milliseconds)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, measure: str, ours: float, reference: float | None = None, **kwargs) -> None:
        self.rows.append(Row(measure, ours, reference, **kwargs))

    def step(self, label: str, r: dict, reference: dict | None = None, goal: str = "", p95_goal: str = "") -> None:
        """p50 and p95 rows of a step measurement (seconds in, milliseconds shown)."""
        for q, g in (("p50", goal), ("p95", p95_goal)):
            self.add(f"{label}, {q} (ms)", r[q] * 1000, reference[q] * 1000 if reference else None,
                     read_bytes=r.get("bytes"), bound_scale=1000, goal=g)

    def print(self, bandwidth: float) -> None:
        print("| measure | ours | reference | speed-up | bound | ours / bound | goal |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for row in self.rows:
            bound = row.read_bytes / bandwidth * row.bound_scale if row.read_bytes else None
            theirs = row.reference
            speed_up = None
            if theirs and row.ours:  # none when either side is 0 (no stream within 80 ms, say)
                speed_up = row.ours / theirs if row.higher_is_better else theirs / row.ours
            cells = [figure(row.ours), "—" if theirs is None else figure(theirs),
                     "—" if speed_up is None else f"{speed_up:.2f}x", figure(bound) if bound else "—",
                     f"{row.ours / bound:.2f}" if bound else "—", row.goal]
            print(f"| {row.measure} | " + " | ".join(cells) + " |")


def mimi_rows(table: Table, mimi: dict) -> None:
    for label, mine, theirs in mimi["rows"]:
        streaming = "per 80 ms frame" in label
        goal = "≤ 20 ms" if streaming and "p50" in label else "1.5x" if "offline" in label else ""
        table.add(f"Mimi {label}", mine, theirs, read_bytes=mimi["bytes"] if streaming else None, bound_scale=1000,
                  goal=goal)


def lm_rows(table: Table, reduced: dict, full: dict) -> None:
    table.step("LM step, reduced config, bf16", reduced["bf16"], reduced["reference"])
    table.step("LM step, reduced config, q8 (int8 kept)", reduced["q8"])
    for name, one, four in (("at a conversation's start", "q8", "q8 x4"), ("3000 steps in", "q8 full", "q8 x4 full")):
        table.add(f"LM step, reduced q8, {name}: 4 batched conversations / 1 (p50)",
                  reduced[four]["p50"] / reduced[one]["p50"], goal="≤ 1.3x")
    if not full:
        return
    q8, ref = full["q8 (int8 kept), ours"], full["bf16, reference"]
    table.step("LM step, 7B, q8 (int8 kept), ours", q8, goal="≤ 1.3x bound")
    long = full["q8, ours, full 3000-step window"]
    table.step("LM step, 7B, q8, 3000 steps in (full KV cache)", long)
    table.add("7B q8: resident memory after load (GB)", q8["rss_model"] / 1e9, goal="≤ 9.5 GB")
    table.add("7B q8: resident, one conversation 3000 steps in (GB)", long["rss"] / 1e9)
    for name, one, four in (("at the start", "q8 (int8 kept), ours", "q8, ours, 4 conversations"),
                            ("3000 steps in", "q8, ours, full 3000-step window",
                             "q8, ours, 4 conversations, full window")):
        table.add(f"LM step, 7B q8, {name}: 4 batched conversations / 1 (p50)", full[four]["p50"] / full[one]["p50"],
                  goal="≤ 1.3x")
    table.step("LM step, 7B, bf16", full["bf16, ours"], ref, goal="≤ 1.3x bound")


def stt_rows(table: Table, stt: dict, layers: int) -> None:
    """Ours in each dtype beside the float32 reference."""
    size = "" if layers == stt_bench.FULL_LAYERS else f" ({layers} of {stt_bench.FULL_LAYERS} layers)"
    ref = stt[REFERENCE]
    for config, r in stt.items():
        if config == REFERENCE:
            continue
        table.step(f"STT{size} live step with Mimi encode, 1 stream, {config}", dict(r["live"]["1"], bytes=r["bytes"]),
                   ref["live"]["1"], goal="≤ 60 ms", p95_goal="≤ 80 ms (real time)")
        table.add(f"STT{size} {config}: streams within 80 ms at p95 (of {stt_bench.STREAMS})",
                  r["streams_within_80ms"], ref["streams_within_80ms"], higher_is_better=True)
        table.add(f"STT{size} {config}: files ({r['files']}), audio seconds per second", r["file_speed"],
                  ref["file_speed"], higher_is_better=True)


def tts_rows(table: Table, tts: dict, layers: int) -> None:
    size = "" if layers == tts_bench.FULL_LAYERS else f" ({layers} of {tts_bench.FULL_LAYERS} layers)"
    ref = tts[REFERENCE]
    for config, r in tts.items():
        if config == REFERENCE:
            continue
        table.add(f"TTS{size} {config}: time to first audio (ms)", r["first"] * 1000, ref["first"] * 1000)
        table.add(f"TTS{size} {config}: real-time factor", r["rtf"], ref["rtf"], read_bytes=r["bytes"],
                  bound_scale=1 / FRAME_SECONDS, goal="1.5x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the full-size 7B (about 15 minutes)")
    parser.add_argument("--steps", type=int, default=20, help="LM steps timed per configuration (default: 20)")
    parser.add_argument("--threads", type=int, help="torch threads in every benchmark (default: torch's choice)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the 8.2 GB GGUF is written")
    parser.add_argument("--stt-layers", type=int, default=stt_bench.FULL_LAYERS,
                        help="STT layers (default: the released 16; fewer only for a quick check)")
    parser.add_argument("--tts-layers", type=int, default=tts_bench.FULL_LAYERS,
                        help="TTS temporal layers (default: the released 16; fewer only for a quick check)")
    args = parser.parse_args()
    if args.threads:  # read by torch at start-up in every child process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    machine = describe()
    start_load = load()
    before = read_bandwidth()
    steps = ("--steps", str(args.steps))
    results: dict = {"machine": machine, "mimi": run_child(BENCH / "mimi_bench.py", "--json")}

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
    results["stt"] = stt_bench.run_configs(STT_CONFIGS, args.stt_layers, stt_bench.STREAMS, stt_bench.STEPS,
                                            stt_bench.FILES, stt_bench.SECONDS)
    results["tts"] = tts_bench.run_configs(TTS_CONFIGS, args.tts_layers)
    # The larger of the start and the end: a shared machine's speed moves during a run, and
    # the bound is the hardware's.
    after = read_bandwidth()
    bandwidth = max(before.bytes_per_second, after.bytes_per_second)
    results["read_bandwidth"] = {"start": before._asdict(), "end": after._asdict()}
    results["load"] = {"start": start_load, "end": load()}

    table = Table()
    mimi_rows(table, results["mimi"])
    lm_rows(table, reduced, full)
    for name, r in results.get("gpu", {}).items():
        table.step(f"GPU: LM step, 7B, {name}", r)
        table.add(f"GPU: 7B {name}: conversations in one step within 80 ms at p95", r["realtime"]["max_realtime"],
                  goal="≥ 16 (H100)", higher_is_better=True)
    stt_rows(table, results["stt"], args.stt_layers)
    tts_rows(table, results["tts"], args.tts_layers)

    out = BENCH / "results" / "latest.json"  # first: a failure in the table below loses no figure
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"moshi-core benchmarks: {machine_line(machine)}\nread bandwidth {before} at the start, {after} at the end "
          f"(the bound uses the larger); load average {start_load} at the start, {results['load']['end']} at the end\n")
    table.print(bandwidth)
    print("\nSTT and TTS rows: the reference runs in float32 (its fastest on a CPU; it has no 8-bit CPU path) "
          "beside each of our configurations.")
    if "gpu" not in results:
        print("GPU: not measured (no CUDA device here).")


if __name__ == "__main__":
    main()
