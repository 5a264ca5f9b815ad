"""`make bench-gpu` (bench/gpu.py): no GPU runs it here, so its smoke run on the CPU goes
through every step the GPU run takes (random models made on the device, Q8_0 quantized
there, each step mode, the lockstep frame of many conversations, bounds, the table, the
JSON) on a tiny LM; and without CUDA the real run refuses to start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from commands import run_checked

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def _positive_percentiles(figure: dict) -> None:
    assert 0 < figure["p50_s"] <= figure["p95_s"]


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_checked([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--json", str(out)], timeout=600)
    results = json.loads(out.read_text())

    assert results["smoke"] and results["machine"]["device"] == "cpu" and results["machine"]["torch"]
    assert results["bandwidth"]["bytes_per_second"] > 1e8 and results["budget_s"] == 0.08
    steps = {(r["dtype"], r["mode"]): r for r in results["lm_step"]}
    assert set(steps) == {(d, m) for d in ("bf16", "q8") for m in ("eager", "cuda-graphs")}
    nothing_compiled = {"graphs": 0, "graph_breaks": 0, "cudagraph_skips": 0}  # on a CPU every mode runs eager
    for r in steps.values():
        _positive_percentiles(r)
        assert r["status"] == "ok" and r["conversations"] == 1 and r["warmup_s"] >= 0
        assert not r["compiled"] and r["compile"] == nothing_compiled
        assert 0 < r["state_bytes"] < r["bytes_read"] and r["bound_s"] > 0
    # Quantized on the device: the q8 step reads int8 values and float16 scales, not bfloat16.
    assert steps["q8", "eager"]["bytes_read"] < 0.7 * steps["bf16", "eager"]["bytes_read"]

    sweep = results["sweeps"]["q8 cuda-graphs"]
    rows = sweep["rows"]
    assert [(r["conversations"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok")]
    for r in rows:
        for part in ("frame", "encode", "lm", "decode", "mimi"):
            _positive_percentiles(r[part])
        # Every frame is its parts' sum: its order statistics bound Mimi's.
        assert r["frame"]["p50_s"] >= r["mimi"]["p50_s"] and r["frame"]["p95_s"] >= r["mimi"]["p95_s"]
        assert 0 < r["mimi_bound_s"] < r["bound_s"] and r["mimi_bytes_read"] < r["bytes_read"]
        assert r["peak_bytes"] is None  # device memory is measured on CUDA only
        assert r["compile"] == nothing_compiled
    state = [r["lm_state_bytes"] + r["mimi_state_bytes"] for r in rows]
    assert sweep["per_conversation"]["state_bytes"] == pytest.approx(state[1] - state[0]) and state[0] > 0
    assert sweep["max_conversations"] == max(
        (r["conversations"] for r in rows if r["frame"]["p95_s"] <= 0.08), default=0)

    assert "| measure | conversations | p50 (ms) | p95 (ms) | bound (ms) |" in done.stdout
    assert "| LM step, q8, cuda-graphs | 1 |" in done.stdout
    assert "| frame (Mimi + LM q8 cuda-graphs + Mimi) | 2 |" in done.stdout
    best = {d: min(r["p50_s"] for (dtype, _), r in steps.items() if dtype == d) for d in ("bf16", "q8")}
    assert [(g["figure"], g["met"]) for g in results["goals"]] == [
        (best["bf16"], best["bf16"] <= 0.012), (best["q8"], best["q8"] <= best["bf16"]),
        (sweep["max_conversations"], False),  # 2 conversations at most
    ]
    assert "conversations within 80 ms at p95" in done.stdout and "goal: >= 64 conversations" in done.stdout


@pytest.mark.slow
def test_past_the_time_limit_nothing_more_is_measured(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_checked([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--time-limit", "0",
                        "--json", str(out)], timeout=600)
    results = json.loads(out.read_text())
    assert {r["status"] for r in results["lm_step"]} == {"not run (time limit)"} and len(results["lm_step"]) == 4
    assert [r["status"] for r in results["sweeps"]["q8 cuda-graphs"]["rows"]] == ["not run (time limit)"] * 2
    assert [g["met"] for g in results["goals"]] == [None, None, None]
    assert done.stdout.count("| not run (time limit) |") == 6 and "not measured" in done.stdout


def test_without_cuda_it_says_so_and_exits_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "has none" in done.stderr and "--device cpu --smoke" in done.stderr
