"""Speech-to-text speed, ours vs Kyutai's reference (`moshi==0.2.13`), in one run on this machine.

    python bench/stt_bench.py [--layers 2] [--streams 1,2,4,8] [--files 4] [--seconds 10]

The model is `kyutai/stt-1b-en_fr`'s config (width 2048, 16 heads, context 750, the voice-activity
heads) with `--layers` of its 16 layers, random weights, float32, written in the official format
and loaded by each side's own loader; Mimi is the full official config. Two measures:
- live: B streams stepped together (Mimi encode of one 80 ms frame each + one LM step); a
  process sustains B real-time streams while the p95 step stays under 80 ms;
- files: a batch of `--files` clips transcribed offline, as audio seconds per second of compute.
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mimi_bench import percentile, speech  # noqa: E402
from oracle import load_reference_mimi, write_reference_mimi, write_stt_folder, write_test_tokenizer  # noqa: E402

from moshi_core.inference.stt import Transcriber, load_stt  # noqa: E402

FRAME = 1920
REAL_TIME = 0.080


def reference_side(folder: Path, reference_lm):
    """The reference's Mimi (32 codebooks) and greedy LMGen over the same weights."""
    from moshi.models.lm import LMGen

    mimi = load_reference_mimi(folder / "mimi-pytorch-e351c8d8@125.safetensors", num_codebooks=32)
    return mimi, LMGen(reference_lm, use_sampling=False, temp=0.0, temp_text=0.0)


def live_step_times(ours: bool, transcriber, ref, batch: int, wav: torch.Tensor, steps: int) -> list[float]:
    frames = wav.expand(batch, -1, -1).split(FRAME, dim=-1)[:steps]
    times = []
    with torch.inference_mode():
        if ours:
            state = transcriber.init_state(batch)
            for frame in frames:
                start = time.perf_counter()
                transcriber.step(frame, state)
                times.append(time.perf_counter() - start)
        else:
            mimi, lm_gen = ref
            with mimi.streaming(batch), lm_gen.streaming(batch):
                for frame in frames:
                    start = time.perf_counter()
                    lm_gen.step(mimi.encode(frame))
                    times.append(time.perf_counter() - start)
    return times[3:]


def file_seconds(ours: bool, transcriber, ref, wavs: torch.Tensor) -> float:
    """Compute time of an offline transcription of the batch, with the same silence around it."""
    start = time.perf_counter()
    with torch.inference_mode():
        if ours:
            transcriber.transcribe(list(wavs))
        else:
            mimi, lm_gen = ref
            pad = (transcriber.prefix_frames * FRAME, transcriber.tail_frames * FRAME)
            codes = mimi.encode(torch.nn.functional.pad(wavs, pad))
            with lm_gen.streaming(wavs.shape[0]):
                for t in range(codes.shape[-1]):
                    lm_gen.step(codes[..., t : t + 1])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="of the 16 layers of stt-1b-en_fr (default: 2)")
    parser.add_argument("--streams", default="1,2,4,8", help="live batch sizes to try (default: 1,2,4,8)")
    parser.add_argument("--steps", type=int, default=40, help="live steps per batch size (default: 40)")
    parser.add_argument("--files", type=int, default=4, help="clips in the offline batch (default: 4)")
    parser.add_argument("--seconds", type=float, default=10, help="length of each clip (default: 10)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # the reference would compile a few functions first

    wav = speech(max(args.seconds, args.steps / 12.5))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mimi_path = write_reference_mimi(tmp / "mimi.safetensors", calibration=wav[..., : 10 * 24000])
        tokenizer = write_test_tokenizer(tmp / "spm.model")
        folder = tmp / "stt"
        reference_lm = write_stt_folder(folder, "stt-1b-en_fr", mimi_path, tokenizer, dim=2048,
                                        num_layers=args.layers, text_card=8000)
        transcriber = Transcriber(load_stt(str(folder), dtype=torch.float32))
        ref = reference_side(folder, reference_lm)

        print(f"# Speech-to-text: stt-1b-en_fr config, {args.layers} layers, float32, {args.threads} threads, "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n")
        print("| live streams | ours p50 | ours p95 | reference p50 | reference p95 | speed-up (p50) |")
        print("|---:|---:|---:|---:|---:|---:|")
        sustained = {"ours": 0, "reference": 0}
        for batch in (int(b) for b in args.streams.split(",")):
            ours = live_step_times(True, transcriber, ref, batch, wav, args.steps)
            theirs = live_step_times(False, transcriber, ref, batch, wav, args.steps)
            for name, times in (("ours", ours), ("reference", theirs)):
                if percentile(times, 0.95) <= REAL_TIME:
                    sustained[name] = batch
            p50, r50 = percentile(ours, 0.5), percentile(theirs, 0.5)
            print(f"| {batch} | {1000 * p50:.1f} ms | {1000 * percentile(ours, 0.95):.1f} ms | {1000 * r50:.1f} ms "
                  f"| {1000 * percentile(theirs, 0.95):.1f} ms | {r50 / p50:.2f}x |")
        print(f"\nReal-time streams sustained (p95 step <= 80 ms, of those tried): ours {sustained['ours']}, "
              f"reference {sustained['reference']}\n")

        clips = wav[..., : int(args.seconds * 24000)].expand(args.files, -1, -1).clone()
        ours = min(file_seconds(True, transcriber, ref, clips) for _ in range(2))
        theirs = min(file_seconds(False, transcriber, ref, clips) for _ in range(2))
        audio = args.files * args.seconds
        print("| files | ours | reference | speed-up |\n|---|---:|---:|---:|")
        print(f"| {args.files} x {args.seconds:g} s, audio seconds per second | {audio / ours:.1f} | "
              f"{audio / theirs:.1f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
