"""TTS: time to first audio and real-time factor, ours vs Kyutai's reference (`moshi==0.2.13`).

    python bench/tts_bench.py [--configs float32,bfloat16,q8,reference-float32] [--layers 16]

The model is `kyutai/tts-1.6b-en_fr`'s released config (its config.json: 16 temporal layers of
width 2048, the 4-layer depth transformer over 32 codebooks, the voice cross-attention, full-size
Mimi; `--layers` fewer for a quick look), random bfloat16 weights written in the official format
(as the release ships them) and loaded by each side's own loader. Each configuration runs in a
process of its own, one after the other (one 1.6 B model in memory at a time: 6.4 GB in float32):
- ours in `float32`, `bfloat16`, or `q8` (Q8_0 weights made at load, `load_tts(quantize="q8")`,
  float32 around them);
- the reference in float32 (`reference-float32`: its fastest on a CPU; it has no 8-bit CPU path)
  or `reference-bfloat16` (slow on CPUs without native bfloat16: minutes).
Both sides get the same voice, text and greedy decoding, so they make the same frames, and
stream: each frame is decoded by Mimi as soon as the LM makes it, as Kyutai's streaming example
does. Time to first audio: from the call to the first PCM frame. Real-time factor: generation
time / seconds of audio (below 1 is faster than real time).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from bandwidth import read_bandwidth  # noqa: E402
from child import run_child  # noqa: E402
from lm_bench import fill_random  # noqa: E402
from machine import machine_line  # noqa: E402
from reads import mimi_bytes, step_bytes  # noqa: E402

TEXT = "Hello, this is a test of streaming speech."
VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"
FULL_LAYERS = 16
FRAME_SECONDS = 0.08
CONFIGS = {  # name: (side, dtype)
    "float32": ("ours", "float32"),
    "bfloat16": ("ours", "bfloat16"),
    "q8": ("ours", "q8"),
    "reference-float32": ("reference", "float32"),
    "reference-bfloat16": ("reference", "bfloat16"),
}
DEFAULT_CONFIGS = "float32,bfloat16,q8,reference-float32"


def released_config(layers: int) -> dict:
    """kyutai/tts-1.6b-en_fr's config.json (the test model's, at the released sizes)."""
    from tts_oracle import TINY_TTS_CONFIG

    config = json.loads(json.dumps(TINY_TTS_CONFIG))  # a deep copy
    config.update(dim=2048, text_card=8000, num_heads=16, num_layers=layers, depformer_dim=1024,
                  depformer_num_heads=16, depformer_num_layers=4, depformer_dim_feedforward=3072,
                  depformer_low_rank_embeddings=128, tokenizer_name="tokenizer.model")
    config["conditioners"]["control"]["lut"]["dim"] = 2048
    return config


def write_folder(folder: Path, layers: int) -> None:
    """The released layout: config, random LM and Mimi weights, a tokenizer and a voice. The LM
    is made on the meta device and filled in bfloat16, so no float32 copy of 1.6 B weights is
    ever in memory."""
    from moshi.models import loaders
    from oracle import official_state_dict
    from tts_oracle import SUFFIX, lm_kwargs, tts_state_dict, write_voice

    config = released_config(layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    lm = loaders.get_moshi_lm(None, lm_kwargs(config), device="meta", dtype=torch.bfloat16)
    lm = lm.to_empty(device="cpu")
    fill_random(lm)
    save_file(tts_state_dict(lm), str(folder / config["moshi_name"]))
    del lm
    save_file(official_state_dict(loaders.get_mimi(None, device="cpu")), str(folder / config["mimi_name"]))
    _write_tokenizer(folder / "tokenizer.model")
    write_voice(folder / "voices" / (VOICE + SUFFIX), seed=1)


def _write_tokenizer(path: Path) -> None:
    import sentencepiece

    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter([TEXT.lower()] * 50), model_writer=f, vocab_size=60, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)


def run_ours(folder: Path, dtype: str) -> dict:
    from moshi_core.inference.tts import TTSRequest, TTSSession, load_tts
    from moshi_core.params import TTSParams

    if dtype == "q8":  # 8-bit matrices, float32 around them (the CPU's fast float)
        model = load_tts(folder, voices=folder / "voices", dtype=torch.float32, quantize="q8")
    else:
        model = load_tts(folder, voices=folder / "voices", dtype=getattr(torch, dtype))
    start = time.perf_counter()
    first, samples = None, 0
    session = TTSSession(model, [TTSRequest(TEXT, VOICE, TTSParams(temp=0.0))])
    for chunk in session.stream():
        first = first or time.perf_counter() - start
        samples += chunk.pcm.shape[-1]
    # A frame reads every LM weight once (the bound's floor) and Mimi's decoder.
    return {"first": first, "total": time.perf_counter() - start, "samples": samples,
            "bytes": step_bytes(model.lm) + mimi_bytes(model.mimi, "decode")}


def run_reference(folder: Path, dtype: str) -> dict:
    from tts_oracle import SUFFIX, reference_tts

    ref = reference_tts(folder, folder / "voices")
    ref.lm.to(getattr(torch, dtype))
    ref.lm.condition_provider.float()
    start = time.perf_counter()
    entries = [ref.prepare_script([TEXT], padding_between=1)]
    attributes = [ref.make_condition_attributes([folder / "voices" / (VOICE + SUFFIX)], cfg_coef=2.0)]
    first, frames = None, 0

    def on_frame(frame: torch.Tensor) -> None:
        nonlocal first, frames
        if (frame[:, 1:] >= 0).all():  # past the delay: audio to decode, as Kyutai streams it
            ref.mimi.decode(frame[:, 1:])
            first = first or time.perf_counter() - start
            frames += 1

    with ref.mimi.streaming(1), torch.no_grad():
        result = ref.generate(entries, attributes, on_frame=on_frame)
    total = time.perf_counter() - start
    # Their simple_generate keeps frames [2, end_step + 2) of the decoded ones, as we do.
    return {"first": first, "total": total, "samples": min(frames - 2, result.end_steps[0]) * 1920, "bytes": None}


def measure(config: str, folder: Path) -> dict:
    side, dtype = CONFIGS[config]
    result = (run_ours if side == "ours" else run_reference)(folder, dtype)
    result["rtf"] = result["total"] / (result["samples"] / 24000)
    return result


def run_configs(configs: list[str], layers: int) -> dict:
    """{config: result}, each measured in a process of its own on one generated model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, layers)
        return {config: run_child(Path(__file__), "--config", config, "--folder", str(folder)) for config in configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"which of {', '.join(CONFIGS)} (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="temporal layers (the model has 16)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--config", choices=CONFIGS, help="measure one configuration (prints JSON)")
    parser.add_argument("--folder", help="with --config: the model folder")
    args = parser.parse_args()
    if args.threads:  # read by torch at start-up in every child process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.config:
        print(json.dumps(measure(args.config, Path(args.folder))))
        return
    before = read_bandwidth()
    results = run_configs(args.configs.split(","), args.layers)
    after = read_bandwidth()
    bandwidth = max(before.bytes_per_second, after.bytes_per_second)
    print(f"# Text to speech: tts-1.6b-en_fr, {args.layers} temporal layers, random weights, greedy; "
          f"{machine_line()}\nread bandwidth {before} before, {after} after (the bound uses the larger)\n")
    print("| configuration | first audio (ms) | audio (s) | RTF | RTF bound |")
    print("|---|---:|---:|---:|---:|")
    for config, r in results.items():
        bound = f"{r['bytes'] / bandwidth / FRAME_SECONDS:.2f}" if r["bytes"] else "—"
        print(f"| {config} | {r['first'] * 1000:.0f} | {r['samples'] / 24000:.2f} | {r['rtf']:.2f} | {bound} |")
    if args.layers != FULL_LAYERS:
        print(f"\n{args.layers} of the model's {FULL_LAYERS} temporal layers: not the released size.")


if __name__ == "__main__":
    main()
