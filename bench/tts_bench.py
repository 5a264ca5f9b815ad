"""TTS: time to first audio and real-time factor, ours vs Kyutai's reference (`moshi==0.2.13`).

    python bench/tts_bench.py [--layers 4] [--dtype float32] [--threads 2]

The model is `kyutai/tts-1.6b-en_fr`'s exact config (its released config.json)
with `--layers` temporal layers instead of 16: real widths, the real 4-layer depth
transformer over 32 codebooks, the voice cross-attention and full-size Mimi. Both sides load
the same random weights from one folder written in the official format, get the same
voice, text and greedy decoding (so they make the same frames), and stream: each frame is
decoded by Mimi as soon as the LM makes it, as Kyutai's streaming example does.
Time to first audio: from the call to the first PCM frame. Real-time factor: generation
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TEXT = "Hello, this is a test of streaming speech."
VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"


def write_folder(folder: Path, layers: int) -> dict:
    """The released config with fewer layers, random LM and Mimi weights, a random voice."""
    from moshi.models import loaders
    from oracle import official_state_dict
    from tts_oracle import SUFFIX, TINY_TTS_CONFIG, random_reference_tts_lm, tts_state_dict, write_voice

    config = dict(TINY_TTS_CONFIG, dim=2048, text_card=8000, num_heads=16, num_layers=layers, depformer_dim=1024,
                  depformer_num_heads=16, depformer_num_layers=4, depformer_dim_feedforward=3072,
                  depformer_low_rank_embeddings=128, tokenizer_name="tokenizer.model")
    config["conditioners"] = json.loads(json.dumps(config["conditioners"]))
    config["conditioners"]["control"]["lut"]["dim"] = 2048
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tts_state_dict(random_reference_tts_lm(config)), str(folder / config["moshi_name"]))
    save_file(official_state_dict(loaders.get_mimi(None, device="cpu")), str(folder / config["mimi_name"]))
    _write_tokenizer(folder / "tokenizer.model")
    write_voice(folder / "voices" / (VOICE + SUFFIX), seed=1)
    return config


def _write_tokenizer(path: Path) -> None:
    import sentencepiece

    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter([TEXT.lower()] * 50), model_writer=f, vocab_size=60, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)


def run_ours(folder: Path, dtype: torch.dtype) -> tuple[float, float, int]:
    from moshi_core.inference.tts import TTSRequest, TTSSession, load_tts
    from moshi_core.params import TTSParams

    model = load_tts(folder, voices=folder / "voices", dtype=dtype)
    start = time.perf_counter()
    first, samples = None, 0
    session = TTSSession(model, [TTSRequest(TEXT, VOICE, TTSParams(temp=0.0))])
    for chunk in session.stream():
        first = first or time.perf_counter() - start
        samples += chunk.pcm.shape[-1]
    return first, time.perf_counter() - start, samples


def run_reference(folder: Path, dtype: torch.dtype) -> tuple[float, float, int]:
    from tts_oracle import SUFFIX, reference_tts

    ref = reference_tts(folder, folder / "voices")
    ref.lm.to(dtype)
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
    return first, total, min(frames - 2, result.end_steps[0]) * 1920


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="temporal layers (the model has 16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, args.layers)
        rows = []
        for name, run in (("reference", run_reference), ("ours", run_ours)):
            first, total, samples = run(folder, dtype)
            seconds = samples / 24000
            rows.append((name, first, total, seconds, total / seconds))
            print(f"{name:10s} first audio {first * 1000:7.0f} ms   {seconds:5.2f} s of audio in {total:6.2f} s"
                  f"   RTF {total / seconds:5.2f}", flush=True)
    print(f"# {args.layers} temporal layers, {args.dtype}, {args.threads} threads, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
