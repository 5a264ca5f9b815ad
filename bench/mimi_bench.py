"""Mimi speed, ours vs Kyutai's reference (`moshi==0.2.13`), in one run on this machine.

    python bench/mimi_bench.py [--seconds 10] [--stream-seconds 16] [--threads N]

Both run the full official config in float32 with 8 codebooks, on the same random weights
(saved in the official format and loaded by each side's own loader), on real speech:
- offline: encode, decode, and both, of a whole clip (best of the repeats);
- streaming: one 80 ms frame encoded then decoded per step, p50/p95 over the clip, and the
  encode alone.
The two sides alternate (repeat by repeat offline, frame by frame streaming), so that on a
shared machine both see the same load. Prints a Markdown table with the ratios (reference
time / our time: > 1 means we are faster) and the load average before and after.
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

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


def best_offline(models: dict, clip: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (encode, decode) seconds of each model over `repeats` alternating runs (after a warm-up)."""
    best = {name: (float("inf"), float("inf")) for name in models}
    for repeat in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            codes = model.encode(clip)
            middle = time.perf_counter()
            model.decode(codes)
            end = time.perf_counter()
            if repeat:
                best[name] = (min(best[name][0], middle - start), min(best[name][1], end - middle))
    return best


def streaming_times(sides: dict, wav: torch.Tensor) -> dict[str, tuple[list[float], list[float]]]:
    """Per side, (encode, encode + decode) seconds of each 80 ms frame, the sides alternating."""
    times = {name: ([], []) for name in sides}
    for frame in wav.split(FRAME, dim=-1):
        for name, (encode, decode) in sides.items():
            start = time.perf_counter()
            codes = encode(frame)
            middle = time.perf_counter()
            decode(codes)
            times[name][0].append(middle - start)
            times[name][1].append(time.perf_counter() - start)
    # The first frames pay for lazy initialisation.
    return {name: (enc[5:], both[5:]) for name, (enc, both) in times.items()}


def load_average() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


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
    load_before = load_average()
    rows = []
    with torch.inference_mode():
        offline = best_offline({"ours": ours, "reference": ref}, clip, args.repeats)
        seconds = f"{args.seconds:g} s"
        rows.append((f"offline encode of {seconds} (s)", offline["ours"][0], offline["reference"][0]))
        rows.append((f"offline decode of {seconds} (s)", offline["ours"][1], offline["reference"][1]))
        rows.append((f"offline encode+decode of {seconds} (s)", sum(offline["ours"]), sum(offline["reference"])))

        state = ours.init_state(1)
        with ref.streaming(1):
            times = streaming_times({
                "ours": (lambda f: ours.encode_step(f, state), lambda c: ours.decode_step(c, state)),
                "reference": (ref.encode, ref.decode),
            }, stream)
    for label, q in (("p50", 0.5), ("p95", 0.95)):
        rows.append((f"streaming encode+decode per 80 ms frame, {label} (ms)",
                     1000 * percentile(times["ours"][1], q), 1000 * percentile(times["reference"][1], q)))
    for label, q in (("p50", 0.5), ("p95", 0.95)):
        rows.append((f"streaming encode alone, 80 ms frame, {label} (ms)",
                     1000 * percentile(times["ours"][0], q), 1000 * percentile(times["reference"][0], q)))
    if args.json:  # a frame reads every weight once: the bytes behind the bandwidth bound
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        print(json.dumps({"rows": rows, "bytes": weights}))
        return

    print(f"Mimi, float32, 8 codebooks; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"load average {load_before} before, {load_average()} after\n")
    print("| measure | ours | reference | speed-up |")
    print("|---|---:|---:|---:|")
    for label, mine, theirs in rows:
        print(f"| {label} | {mine:.3g} | {theirs:.3g} | {theirs / mine:.2f}x |")
    rtf = statistics.median(times["ours"][1]) / 0.080
    print(f"\nour streaming real-time factor: {rtf:.2f} (compute time / audio time; < 1 is real time)")


if __name__ == "__main__":
    main()
