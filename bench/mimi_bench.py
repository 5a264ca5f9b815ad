"""Mimi speed, ours vs Kyutai's reference (`moshi==0.2.13`), in one run on this machine.

    python bench/mimi_bench.py [--seconds 10] [--stream-seconds 16] [--threads N]

Both run the full official config in float32 with 8 codebooks, on the same random weights
(saved in the official format and loaded by each side's own loader), on real speech:
- offline: encode + decode of a whole clip;
- streaming: one 80 ms frame encoded then decoded per step, p50/p95 over the clip.
Prints a Markdown table with the ratios (reference time / our time: > 1 means we are faster).
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from oracle import load_reference_mimi, write_reference_mimi  # noqa: E402

from moshi_core.formats.audio import load_audio  # noqa: E402
from moshi_core.loading.checkpoints import load_mimi  # noqa: E402

SHARED_AUDIO = ROOT.parent / "shared" / "audio"
FRAME = 1920


def speech(seconds: float) -> torch.Tensor:
    """Real speech [1, 1, T]: the shared clips, concatenated and repeated to `seconds`."""
    clips = [load_audio(SHARED_AUDIO / n) for n in ("en_long_24k.wav", "en_question_24k.wav", "fr_human_intro.mp3")]
    wav = torch.cat(clips, dim=-1)
    frames = int(seconds * 12.5)
    while wav.shape[-1] < frames * FRAME:
        wav = torch.cat([wav, wav], dim=-1)
    return wav[None, :, : frames * FRAME]


def best_of(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def streaming_times(encode, decode, wav: torch.Tensor) -> list[float]:
    times = []
    for frame in wav.split(FRAME, dim=-1):
        start = time.perf_counter()
        decode(encode(frame))
        times.append(time.perf_counter() - start)
    return times[5:]  # the first frames pay for lazy initialisation


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="offline clip length (default: 10)")
    parser.add_argument("--stream-seconds", type=float, default=16, help="streamed speech (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="offline runs, best kept (default: 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (for bench/run_all.py)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_reference_mimi(Path(tmp) / "mimi.safetensors", calibration=speech(7))
        ours = load_mimi(path, num_codebooks=8)
        ref = load_reference_mimi(path, num_codebooks=8)

    clip, stream = speech(args.seconds), speech(args.stream_seconds)
    rows = []
    with torch.inference_mode():
        offline = {}
        for name, model in (("ours", ours), ("reference", ref)):
            offline[name] = best_of(lambda: model.decode(model.encode(clip)), args.repeats)
        rows.append((f"offline encode+decode of {args.seconds:g} s (s)", offline["ours"], offline["reference"]))

        state = ours.init_state(1)
        ours_times = streaming_times(lambda f: ours.encode_step(f, state), lambda c: ours.decode_step(c, state), stream)
        with ref.streaming(1):
            ref_times = streaming_times(ref.encode, ref.decode, stream)
    for label, q in (("p50", 0.5), ("p95", 0.95)):
        rows.append((f"streaming encode+decode per 80 ms frame, {label} (ms)",
                     1000 * percentile(ours_times, q), 1000 * percentile(ref_times, q)))
    if args.json:  # a frame reads every weight once: the bytes behind the bandwidth bound
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        print(json.dumps({"rows": rows, "bytes": weights}))
        return

    print(f"Mimi, float32, 8 codebooks; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| measure | ours | reference | speed-up |")
    print("|---|---:|---:|---:|")
    for label, mine, theirs in rows:
        print(f"| {label} | {mine:.3g} | {theirs:.3g} | {theirs / mine:.2f}x |")
    rtf = statistics.median(ours_times) / 0.080
    print(f"\nour streaming real-time factor: {rtf:.2f} (compute time / audio time; < 1 is real time)")


if __name__ == "__main__":
    main()
