"""Speech-to-text speed, ours vs Kyutai's reference (`moshi==0.2.13`), in one run on this machine.

    python bench/stt_bench.py [--configs q8,bfloat16,float32,reference-float32] [--layers 16]
                              [--streams 1,2,4,8] [--steps 20] [--files 4] [--seconds 10]

The model is `kyutai/stt-1b-en_fr`'s released config (16 layers of width 2048, 16 heads, context
750, the voice-activity heads; `--layers` fewer for a quick look) with random weights made here,
written in the official format and loaded by each side's own loader; Mimi is the full official
config at 32 codebooks. Each configuration runs in a process of its own, one after the other:
- ours in `q8` (Q8_0 weights made from the float checkpoint at load, `load_stt(quantize="q8")`,
  float32 around them), `bfloat16` or `float32`;
- the reference in float32 (`reference-float32`: its fastest on a CPU; it has no 8-bit CPU path)
  or `reference-bfloat16`.

Two measures:
- live: B streams stepped together, each step the Mimi encode of one 80 ms frame per stream
  plus one LM step (with the voice-activity heads), p50/p95; B = 1, 2, 4, ... of `--streams`
  until the p95 passes 80 ms, and the largest B within it (the streams one process sustains);
- files: `--files` clips of `--seconds` transcribed as one batch, in audio seconds per second of
  compute (silence around them as the transcriber adds it; the reference gets the same).
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from bandwidth import read_bandwidth  # noqa: E402
from child import run_child  # noqa: E402
from machine import machine_line  # noqa: E402
from mimi_bench import percentile, speech  # noqa: E402
from reads import mimi_bytes, step_bytes  # noqa: E402

MODEL = "stt-1b-en_fr"
FULL_LAYERS = 16
FRAME = 1920
REAL_TIME = 0.080
CONFIGS = {  # name: (side, dtype)
    "q8": ("ours", "q8"),
    "bfloat16": ("ours", "bfloat16"),
    "float32": ("ours", "float32"),
    "reference-float32": ("reference", "float32"),
    "reference-bfloat16": ("reference", "bfloat16"),
}
DEFAULT_CONFIGS = "q8,bfloat16,float32,reference-float32"
STREAMS, STEPS, FILES, SECONDS = "1,2,4,8", 20, 4, 10.0  # the defaults of a run


def write_model(folder: Path, layers: int) -> None:
    """The released config with `layers` layers and random weights, laid out like the repo."""
    from oracle import write_reference_mimi, write_stt_folder, write_test_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    mimi = write_reference_mimi(folder.parent / "mimi.safetensors", calibration=speech(10))
    tokenizer = write_test_tokenizer(folder.parent / "spm.model")
    write_stt_folder(folder, MODEL, mimi, tokenizer, dim=2048, num_layers=layers, text_card=8000)


class Ours:
    def __init__(self, folder: Path, dtype: str) -> None:
        from moshi_core.inference.stt import Transcriber, load_stt

        if dtype == "q8":  # 8-bit matrices, float32 around them (the CPU's fast float)
            models = load_stt(str(folder), dtype=torch.float32, quantize="q8")
        else:
            models = load_stt(str(folder), dtype=getattr(torch, dtype))
        self.transcriber = Transcriber(models)
        self.bytes = step_bytes(models.lm) + mimi_bytes(models.mimi, "encode")

    def live(self, frames: list[torch.Tensor]) -> list[float]:
        state, times = self.transcriber.init_state(frames[0].shape[0]), []
        for frame in frames:
            start = time.perf_counter()
            self.transcriber.step(frame, state)
            times.append(time.perf_counter() - start)
        return times

    def transcribe(self, clips: torch.Tensor) -> None:
        self.transcriber.transcribe(list(clips))


class Reference:
    def __init__(self, folder: Path, dtype: str) -> None:
        from moshi.models import loaders
        from moshi.models.lm import LMGen
        from oracle import STT_CONFIGS, load_reference_mimi

        from moshi_core.inference.stt import TAIL_SECONDS, STTConfig

        config = json.loads((folder / "config.json").read_text())
        lm_kwargs = {k: v for k, v in config.items() if k in STT_CONFIGS[MODEL]}
        lm = loaders.get_moshi_lm(folder / "model.safetensors", lm_kwargs, device="cpu", dtype=getattr(torch, dtype))
        self.mimi = load_reference_mimi(folder / config["mimi_name"], num_codebooks=32)
        self.lm_gen = LMGen(lm.eval(), use_sampling=False, temp=0.0, temp_text=0.0)
        # A file gets the silence around it that our Transcriber adds: the same number of steps.
        stt = STTConfig.from_config(config)
        prefix = max(1, math.ceil(stt.audio_silence_prefix_seconds * 12.5))
        self.pad = (prefix * FRAME, math.ceil((stt.audio_delay_seconds + TAIL_SECONDS) * 12.5) * FRAME)
        self.bytes = None

    def live(self, frames: list[torch.Tensor]) -> list[float]:
        times = []
        with self.mimi.streaming(frames[0].shape[0]), self.lm_gen.streaming(frames[0].shape[0]):
            for frame in frames:
                start = time.perf_counter()
                self.lm_gen.step_with_extra_heads(self.mimi.encode(frame))
                times.append(time.perf_counter() - start)
        return times

    def transcribe(self, clips: torch.Tensor) -> None:
        codes = self.mimi.encode(torch.nn.functional.pad(clips, self.pad))
        with self.lm_gen.streaming(clips.shape[0]):
            for t in range(codes.shape[-1]):
                self.lm_gen.step_with_extra_heads(codes[..., t : t + 1])


def measure(config: str, folder: Path, streams: list[int], steps: int, files: int, seconds: float) -> dict:
    """One configuration's live sweep and file speed."""
    side, dtype = CONFIGS[config]
    runner = (Ours if side == "ours" else Reference)(folder, dtype)
    wav = speech(max(seconds, (steps + 3) / 12.5))
    live, within = {}, 0
    with torch.inference_mode():
        for batch in streams:
            frames = list(wav.expand(batch, -1, -1).split(FRAME, dim=-1)[: steps + 3])
            times = runner.live(frames)[3:]  # the first steps pay for lazy initialisation
            live[batch] = {"p50": percentile(times, 0.5), "p95": percentile(times, 0.95)}
            if live[batch]["p95"] > REAL_TIME:
                break  # more streams only take longer
            within = batch
        clips = wav[..., : int(seconds * 24000)].expand(files, -1, -1).clone()
        start = time.perf_counter()
        runner.transcribe(clips)
        compute = time.perf_counter() - start
    return {"live": live, "streams_within_80ms": within, "file_speed": files * seconds / compute,
            "files": f"{files} x {seconds:g} s", "bytes": runner.bytes}


def run_configs(configs: list[str], layers: int, streams: str, steps: int, files: int, seconds: float) -> dict:
    """{config: result}, each measured in a process of its own on one generated model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / MODEL
        write_model(folder, layers)
        common = ("--folder", str(folder), "--streams", streams, "--steps", str(steps), "--files", str(files),
                  "--seconds", str(seconds))
        return {config: run_child(Path(__file__), "--config", config, *common) for config in configs}


def print_table(results: dict, layers: int, bandwidth: float) -> None:
    print("| configuration | streams | live step p50 (ms) | p95 (ms) | bound (ms) |")
    print("|---|---:|---:|---:|---:|")
    for config, r in results.items():
        bound = f"{r['bytes'] / bandwidth * 1000:.0f}" if r["bytes"] else "—"
        for batch, t in r["live"].items():
            print(f"| {config} | {batch} | {t['p50'] * 1000:.0f} | {t['p95'] * 1000:.0f} | {bound} |")
    print("\n| configuration | streams within 80 ms at p95 | files: audio seconds per second |")
    print("|---|---:|---:|")
    for config, r in results.items():
        print(f"| {config} | {r['streams_within_80ms']} | {r['file_speed']:.2f} ({r['files']}) |")
    if layers != FULL_LAYERS:
        print(f"\n{layers} of the model's {FULL_LAYERS} layers: not the released size.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"which of {', '.join(CONFIGS)} (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="of the model's 16 layers (default: 16)")
    parser.add_argument("--streams", default=STREAMS, help="live batch sizes to try (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS, help="live steps timed per batch (default: %(default)s)")
    parser.add_argument("--files", type=int, default=FILES, help="clips in the file batch (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="length of each clip (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--config", choices=CONFIGS, help="measure one configuration (prints JSON)")
    parser.add_argument("--folder", help="with --config: the model folder")
    args = parser.parse_args()
    if args.threads:  # read by torch at start-up in every child process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # the reference would compile a few functions first
    streams = [int(b) for b in args.streams.split(",")]
    if args.config:
        print(json.dumps(measure(args.config, Path(args.folder), streams, args.steps, args.files, args.seconds)))
        return
    before = read_bandwidth()
    results = run_configs(args.configs.split(","), args.layers, args.streams, args.steps, args.files, args.seconds)
    after = read_bandwidth()
    print(f"# Speech to text: {MODEL}, {args.layers} layers, random weights, Mimi encode included; "
          f"{machine_line()}\nread bandwidth {before} before, {after} after (the bound uses the larger)\n")
    print_table(results, args.layers, max(before.bytes_per_second, after.bytes_per_second))


if __name__ == "__main__":
    main()
