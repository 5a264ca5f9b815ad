"""`moshi-core tts`: text (argument, file or stdin) -> 24 kHz wav, plus the timed words."""

import argparse
import json
import sys
from pathlib import Path

from moshi_core.errors import InvalidParameterError
from moshi_core.loading.catalog import DEFAULT_TTS_SOURCE, DEFAULT_VOICE, DEFAULT_VOICE_REPO
from moshi_core.params import TTSParams

MAX_TEXT_CHARS = 100_000  # about an hour of speech; refuse pasted-in novels with a message


def add_tts_parser(sub, add_lm_options) -> None:
    defaults = TTSParams()
    tts = sub.add_parser("tts", help="text -> speech (Kyutai's TTS model), with word timestamps",
                         description=run_tts.__doc__)
    tts.add_argument("text", nargs="?", metavar="TEXT", help="the text to say; - reads it from stdin")
    tts.add_argument("--text-file", metavar="FILE", help="read the text from this UTF-8 file instead")
    tts.add_argument("-o", "--output", required=True, metavar="OUT.wav", help="wav file to write")
    tts.add_argument("--words", metavar="OUT.json", help="the words with their times in the audio")
    tts.add_argument("--voice", default=DEFAULT_VOICE,
                     help="a voice of --voices by name, an hf://OWNER/REPO/FILE URI or a local .safetensors "
                          "file (default: %(default)s)")
    tts.add_argument("--voices", default=DEFAULT_VOICE_REPO, metavar="SOURCE",
                     help="the voice repo: a Hub repo id or a local folder laid out like it (default: %(default)s)")
    add_lm_options(tts, DEFAULT_TTS_SOURCE, "TTS")
    tts.add_argument("--seed", type=int, help="seed for reproducible sampling")
    tts.add_argument("--temp", type=float, default=defaults.temp, help="sampling temperature (default: %(default)s)")
    tts.add_argument("--cfg", type=float, default=defaults.cfg_coef, metavar="COEF",
                     help="guidance strength the model was distilled with, 1.0 to 4.0 by 0.5 (default: %(default)s)")


def read_text(args: argparse.Namespace) -> str:
    if args.text_file and args.text:
        raise InvalidParameterError("give the text or --text-file, not both")
    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidParameterError(f"cannot read the text file {args.text_file!r}: {exc}") from exc
    elif args.text == "-":
        text = sys.stdin.read()
    elif args.text:
        text = args.text
    else:
        raise InvalidParameterError("no text: give it as an argument, with --text-file, or - for stdin")
    text = text.strip()
    if not text:
        raise InvalidParameterError("the text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidParameterError(f"the text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return " ".join(text.split())  # line breaks are spaces


def run_tts(args: argparse.Namespace) -> None:
    """Say a text with Kyutai's text-to-speech model (English and French with the default)
    in one of the voices of a voice repo. Writes 24 kHz mono wav; --words writes the
    words with their start and end times (JSON). <break time="1s"/> in the text
    inserts a pause."""
    from moshi_core.formats.audio import atomic_write_bytes, write_wav
    from moshi_core.inference.tts import TTSRequest, load_tts, synthesize
    from moshi_core.loading.device import parse_dtype, resolve_device
    from moshi_core.loading.tts_info import describe_tts

    text = read_text(args)
    params = TTSParams(temp=args.temp, cfg_coef=args.cfg, seed=args.seed)
    info = describe_tts(args.model, args.voices, args.revision)  # bad input fails before the model loads
    info.check_cfg(args.cfg)
    info.voices.path(args.voice, allow_paths=True)
    model = load_tts(args.model, voices=args.voices, device=resolve_device(args.device),
                     dtype=parse_dtype(args.dtype), revision=args.revision, quantize=args.quantize)
    rate = model.mimi.frame_rate

    def progress(step: int) -> None:
        if not args.quiet and step % 25 == 0:
            print(f"tts: {step / rate:.1f} s of speech generated", file=sys.stderr, flush=True)

    result = synthesize(model, [TTSRequest(text, args.voice, params, allow_voice_paths=True)], on_step=progress)[0]
    write_wav(args.output, result.pcm[None])
    if args.words:
        words = {"text": text, "words": [w.to_dict() for w in result.words]}
        atomic_write_bytes(args.words, json.dumps(words, ensure_ascii=False, indent=2).encode())
    if not args.quiet:
        seconds = result.pcm.shape[-1] / model.mimi.sample_rate
        note = "" if result.complete else " (stopped at the step limit before the end of the text)"
        print(f"wrote {args.output}: {seconds:.2f} s{note}", file=sys.stderr)
