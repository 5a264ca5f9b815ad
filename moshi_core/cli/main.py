"""`moshi-core` command line: Mimi encode/decode, Moshi dialogue, speech to text and text to speech, on files."""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from moshi_core.errors import MoshiError
from moshi_core.loading.catalog import (
    DEFAULT_LM_SOURCE,
    DEFAULT_STT_SOURCE,
    DEFAULT_TTS_SOURCE,
    STT_MODELS,
    SUPPORTED_MODELS,
    TTS_MODELS,
)
from moshi_core.loading.hub import DEFAULT_MIMI_SOURCE
from moshi_core.params import (
    DTYPE_NAMES, NO_CUDA_GRAPH, NO_TORCH_COMPILE, QUANTIZE_MODES, GpuStep, SamplingParams, gpu_step_for,
)

MODEL_SOURCE_HELP = (
    "a Hugging Face repo id (OWNER/REPO, optionally OWNER/REPO@REVISION), an "
    "hf://OWNER/REPO/FILE URI, or a local file or folder; downloads honour HF_HOME, "
    "HF_HUB_OFFLINE and HF_TOKEN"
)
QUANTIZE_HELP = (
    "q8: turn a float checkpoint's LM matrices (its linear layers and embeddings, what Kyutai's "
    "q8 GGUF holds in 8 bits) into GGUF Q8_0 as they load; norms, biases and Mimi stay float. "
    "The LM then takes 1.06 bytes per weight instead of 2 (Moshi 7B: 8.2 GB instead of 15.4), "
    "and the float weights are never all in memory. A CPU step reads half the bytes of "
    "bfloat16; on a GPU it saves memory but runs slower (the weights are dequantized for each "
    "product). An 8-bit checkpoint such as the GGUF is 8-bit already: q8 changes nothing"
)


class ProgressPrinter:
    """Prints `label: 42% (5.0 s of 12.0 s)` to stderr, at most every half second."""

    def __init__(self, label: str, seconds_per_frame: float, stream=sys.stderr) -> None:
        self.label, self.seconds_per_frame, self.stream = label, seconds_per_frame, stream
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.5:
            return
        self.last = now
        end = "\n" if done >= total or not self.stream.isatty() else "\r"
        self.stream.write(
            f"{self.label}: {100 * done // max(total, 1):3d}% "
            f"({done * self.seconds_per_frame:.1f} s of {total * self.seconds_per_frame:.1f} s){end}"
        )
        self.stream.flush()


def _codebook_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 32:
        raise argparse.ArgumentTypeError(f"the number of codebooks must be between 1 and 32, not {text!r}")
    return n


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mimi", default=DEFAULT_MIMI_SOURCE, metavar="SOURCE",
        help=f"where the Mimi weights come from: {MODEL_SOURCE_HELP} (default: %(default)s)",
    )
    parser.add_argument("--revision", help="pin a Hub revision (branch, tag or commit) of --mimi")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available; default)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print no progress")


def add_lm_options(parser: argparse.ArgumentParser, default_model: str, what: str) -> None:
    """--model, --revision, --device, --dtype, --quantize and --quiet, as every model command takes them."""
    parser.add_argument("--model", default=default_model, metavar="SOURCE",
                        help=f"the {what} model: {MODEL_SOURCE_HELP} (default: %(default)s)")
    parser.add_argument("--revision", help="pin a Hub revision of --model")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available; default)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                        help="model weights and compute (default: %(default)s)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                        help=QUANTIZE_HELP + " (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no progress")


def _gpu_step() -> GpuStep:
    """How CUDA steps run, from Kyutai's switches as its own tools read them (set and not "0": on)."""
    def on(name: str) -> bool:
        return os.environ.get(name, "").strip() not in ("", "0")
    return gpu_step_for(on(NO_TORCH_COMPILE), on(NO_CUDA_GRAPH))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-core",
        description="Kyutai's Mimi codec, Moshi, speech-to-text and text-to-speech from the command line.",
    )
    parser.add_argument("--no-cpu-kernels", action="store_true",
                        help="run the portable PyTorch path instead of our C++ CPU kernels (what MOSHI_CPU_KERNELS=0 "
                             "does for the servers)")
    parser.add_argument("--strict-q8", action="store_true",
                        help="multiply 8-bit (Q8_0) weights with float activations, giving the dequantized model's "
                             "numbers exactly, instead of in int8 as GGUF runtimes do (faster; what "
                             "MOSHI_Q8_ACTIVATIONS=float does for the servers)")
    parser.add_argument("--gpu-q8", choices=("int8", "dequantize"), default="int8",
                        help="on CUDA, run 8-bit weights as int8 through the Triton kernel (default) or dequantize "
                             "them at load while the GPU has room (what MOSHI_GPU_Q8 does for the servers)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Each command's description is the docstring of the function that runs it.
    enc = sub.add_parser("encode", help="audio file(s) -> Mimi token file", description=_encode.__doc__)
    enc.add_argument("audio", nargs="+", metavar="AUDIO", help="input audio file(s)")
    enc.add_argument("-o", "--output", required=True, metavar="TOKENS", help="token file to write (.safetensors)")
    enc.add_argument(
        "-n", "--num-codebooks", type=_codebook_count, default=8, metavar="K",
        help="codebooks per frame, 1..32: 8 is what Moshi uses (1.1 kbps), 32 is the best quality (default: 8)",
    )
    enc.add_argument("--max-seconds", type=float, help="refuse inputs longer than this")
    _add_model_options(enc)

    dec = sub.add_parser("decode", help="Mimi token file -> 24 kHz wav", description=_decode.__doc__)
    dec.add_argument("tokens", metavar="TOKENS", help="token file (.safetensors)")
    dec.add_argument("-o", "--output", required=True, metavar="OUT.wav", help="wav file to write")
    _add_model_options(dec)

    sub.add_parser("models", help="list the models --model knows by name",
                   description="The Hub repos moshi-core runs, with what they hold. Any folder laid out "
                               "like them works too.")

    sub.add_parser("build-kernels", help="compile the CPU kernels now rather than on first use",
                   description="Build (or find in the cache) the C++ kernels a CPU step runs (moshi_core/kernels/csrc; "
                               "about a minute on two cores). Without them the portable PyTorch path runs.")

    dia = sub.add_parser("dialogue", help="user audio file(s) -> Moshi's spoken answer, text and a stereo mix",
                         description=_dialogue.__doc__)
    dia.add_argument("audio", nargs="+", metavar="AUDIO", help="the user's audio (wav, flac, ogg/opus, mp3)")
    dia.add_argument("-o", "--output", required=True, metavar="OUT.wav", help="Moshi's voice")
    dia.add_argument("--text", metavar="OUT.json", help="Moshi's text with word timestamps")
    dia.add_argument("--stereo", metavar="OUT_STEREO.wav", help="user left, Moshi right")
    add_lm_options(dia, DEFAULT_LM_SOURCE, "Moshi")
    dia.add_argument("--seed", type=int, help="seed for reproducible sampling")
    defaults, kyutai = "default: the model's lm_gen_config, else Kyutai's", SamplingParams()
    dia.add_argument("--temp-text", type=float, metavar="T", help=f"text temperature ({defaults}: {kyutai.temp_text})")
    dia.add_argument("--temp-audio", type=float, metavar="T", help=f"audio temperature ({defaults}: {kyutai.temp})")
    dia.add_argument("--top-k-text", type=int, metavar="K", help=f"text top-k ({defaults}: {kyutai.top_k_text})")
    dia.add_argument("--top-k-audio", type=int, metavar="K", help=f"audio top-k ({defaults}: {kyutai.top_k})")
    dia.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    dia.add_argument("--max-seconds", type=float, help="refuse inputs longer than this")

    stt = sub.add_parser("transcribe", help="speech file(s) -> text with word timestamps (Kyutai's STT models)",
                         description=_transcribe.__doc__)
    stt.add_argument("audio", nargs="+", metavar="AUDIO", help="speech (wav, flac, ogg/opus, mp3; any rate)")
    stt.add_argument("-o", "--output", metavar="OUT", help="transcript file (default: stdout)")
    stt.add_argument("-f", "--format", default="json", choices=["json", "text", "srt", "vtt"],
                     help="transcript format (default: %(default)s)")
    add_lm_options(stt, DEFAULT_STT_SOURCE, "speech-to-text (also kyutai/stt-2.6b-en)")
    stt.add_argument("--max-seconds", type=float, help="refuse inputs longer than this")

    from moshi_core.cli.tts import add_tts_parser

    add_tts_parser(sub, add_lm_options)
    return parser


def _load_mimi(args: argparse.Namespace):
    from moshi_core.loading.checkpoints import load_mimi
    from moshi_core.loading.device import resolve_device

    return load_mimi(args.mimi, device=resolve_device(args.device), revision=args.revision)


def _encode(args: argparse.Namespace) -> None:
    """Encode audio (wav, flac, ogg/opus, mp3; any rate and channel count, converted to
    24 kHz mono) into Mimi codes at 12.5 frames per second, saved as a safetensors
    token file. Several inputs are encoded as one batch into one file."""
    from moshi_core.formats.tokens import save_tokens
    from moshi_core.inference.codec import encode_audio, load_batch

    wavs = load_batch(args.audio, args.max_seconds)  # bad input fails before the model loads
    mimi = _load_mimi(args)
    progress = None if args.quiet else ProgressPrinter("encoding", 1 / mimi.frame_rate)
    audio = wavs if len(wavs) > 1 else wavs[0]
    tokens = encode_audio(mimi, audio, num_codebooks=args.num_codebooks, progress=progress)
    save_tokens(args.output, tokens)
    if not args.quiet:
        print(
            f"wrote {args.output}: {tokens.batch_size} item(s), {tokens.num_codebooks} codebooks, "
            f"{tokens.num_frames} frames", file=sys.stderr,
        )


def _decode(args: argparse.Namespace) -> None:
    """Decode a token file written by `moshi-core encode` (or any file in that format)
    back to 24 kHz mono 16-bit wav, trimmed to the source length. A batched file
    gives one wav per item: OUT.0.wav, OUT.1.wav, ..."""
    from moshi_core.formats.audio import write_wav
    from moshi_core.formats.tokens import load_tokens
    from moshi_core.inference.codec import decode_tokens

    tokens = load_tokens(args.tokens)  # validate before paying for the model
    mimi = _load_mimi(args)
    progress = None if args.quiet else ProgressPrinter("decoding", 1 / mimi.frame_rate)
    wavs = decode_tokens(mimi, tokens, progress=progress)
    paths = [_numbered(args.output, i, tokens.batched) for i in range(len(wavs))]
    for path, wav in zip(paths, wavs):
        write_wav(path, wav)
        if not args.quiet:
            print(f"wrote {path}", file=sys.stderr)


def _numbered(path: str, index: int, batched: bool) -> Path:
    out = Path(path)
    return out.with_suffix(f".{index}{out.suffix}") if batched else out


def _dialogue(args: argparse.Namespace) -> None:
    """Play the user's side of a conversation from a file to Moshi and record Moshi's side:
    its voice (24 kHz wav, as long as the input), its inner-monologue text with word
    timestamps (JSON), and a stereo file with the user left and Moshi right. Several
    inputs run as one batch; outputs then get .0, .1, ... before their suffix."""
    import json

    from moshi_core.formats.audio import atomic_write_bytes, write_wav
    from moshi_core.inference.codec import load_batch
    from moshi_core.inference.dialogue import run_dialogue
    from moshi_core.loading.device import parse_dtype, resolve_device
    from moshi_core.loading.registry import load_moshi
    from moshi_core.params import SamplingOverrides

    # Checks the values before anything loads.
    overrides = SamplingOverrides(temp_text=args.temp_text, top_k_text=args.top_k_text, temp_audio=args.temp_audio,
                                  top_k_audio=args.top_k_audio, greedy=args.greedy)
    wavs = load_batch(args.audio, args.max_seconds)  # bad input fails before the model loads
    models = load_moshi(args.model, device=resolve_device(args.device), dtype=parse_dtype(args.dtype),
                        revision=args.revision, quantize=args.quantize, gpu_step=_gpu_step())
    sampling = overrides.resolve(models.generation_defaults)
    progress = None if args.quiet else ProgressPrinter("dialogue", 1 / models.mimi.frame_rate)
    batched = len(wavs) > 1
    results = run_dialogue(models, wavs if batched else wavs[0], sampling=sampling, seed=args.seed,
                           progress=progress)
    for i, result in enumerate(results if batched else [results]):
        write_wav(_numbered(args.output, i, batched), result.audio)
        if args.stereo:
            write_wav(_numbered(args.stereo, i, batched), result.stereo)
        if args.text:
            atomic_write_bytes(_numbered(args.text, i, batched), json.dumps(result.transcript(), indent=2).encode())
        if not args.quiet:
            print(f"Moshi: {result.text}", file=sys.stderr)


def _transcribe(args: argparse.Namespace) -> None:
    """Transcribe speech with Kyutai's speech-to-text models (English and French with the
    default). Words are printed on stderr as they are recognised; the transcript goes to
    stdout or -o, as JSON (text and timed words), plain text, SubRip or WebVTT. Several
    inputs run as one batch; -o then gets .0, .1, ... before its suffix."""
    from moshi_core.formats.audio import atomic_write_bytes
    from moshi_core.formats.subtitles import format_transcript
    from moshi_core.inference.codec import load_batch
    from moshi_core.inference.stt import Transcriber, load_stt
    from moshi_core.loading.device import parse_dtype, resolve_device

    wavs = load_batch(args.audio, args.max_seconds)
    models = load_stt(args.model, device=resolve_device(args.device), dtype=parse_dtype(args.dtype),
                      revision=args.revision, quantize=args.quantize, gpu_step=_gpu_step())
    transcriber = Transcriber(models)
    batched = len(wavs) > 1

    def show(item, words):
        prefix = f"[{item}] " if batched else ""
        print(prefix + " ".join(f"{w.text}" for w in words), file=sys.stderr, flush=True)

    results = transcriber.transcribe(wavs, on_words=None if args.quiet else show)
    for i, transcript in enumerate(results):
        text = format_transcript(transcript, args.format)
        if args.output:
            atomic_write_bytes(_numbered(args.output, i, batched), text.encode())
        else:
            sys.stdout.write(text)


def _models(args: argparse.Namespace) -> None:
    for title, models, default in (("Moshi (dialogue: --model)", SUPPORTED_MODELS, DEFAULT_LM_SOURCE),
                                   ("speech to text (transcribe --model)", STT_MODELS, DEFAULT_STT_SOURCE),
                                   ("text to speech (tts --model)", TTS_MODELS, DEFAULT_TTS_SOURCE)):
        print(f"{title}:")
        for repo, what in models.items():
            print(f"  {repo:30s} {what}{'  [default]' if repo == default else ''}")


def _build_kernels(args: argparse.Namespace) -> None:
    from moshi_core.kernels import build as cpu_kernels
    from moshi_core.kernels import q8

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the reason a build failed
    began = time.monotonic()
    folder, cached = cpu_kernels.build_directory(), cpu_kernels.is_built()
    if cpu_kernels.supported() and not cached:  # progress on stderr: stdout is the one-line result
        print(f"building CPU kernels (about a minute, once per environment) into {folder}", file=sys.stderr, flush=True)
    built = cpu_kernels.kernels() is not None
    state = f"ready, {'already built' if cached else 'built'} in {folder}" if built else \
        "not available, the portable PyTorch path runs"
    if built and not cpu_kernels.ENABLED:
        state += ", but --no-cpu-kernels turns them off"
    elif built:
        state += "; 8-bit weights multiply " + (f"in int8 ({cpu_kernels.kernels().q8_int8_instructions()})"
                                                if q8.INT8_ACTIVATIONS else "with float activations (--strict-q8)")
    print(f"CPU kernels: {state} ({time.monotonic() - began:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moshi_core.kernels import build as cpu_kernels
    from moshi_core.kernels import q8

    cpu_kernels.set_enabled(not args.no_cpu_kernels)
    q8.set_int8_activations(not args.strict_q8)
    q8.set_gpu_q8(args.gpu_q8)
    try:
        from moshi_core.cli.tts import run_tts

        commands = {"encode": _encode, "decode": _decode, "dialogue": _dialogue, "transcribe": _transcribe,
                    "models": _models, "tts": run_tts, "build-kernels": _build_kernels}
        commands[args.command](args)
    except MoshiError as exc:
        print(f"moshi-core {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
