"""Speech-to-text with Kyutai's STT models (`kyutai/stt-1b-en_fr`, `kyutai/stt-2.6b-en`).

They are Moshi's architecture with the roles turned around: the 32 Mimi codebooks of the
audio go in (no depth transformer, `dep_q = 0`) and one text token comes out per 80 ms
frame, trained to lag the audio by `stt_config.audio_delay_seconds` (0.5 s / 2.5 s).
So the audio is led by `audio_silence_prefix_seconds` of silence and followed by the delay
(plus a second, for the last word to close) of silence, as Kyutai's scripts do.

Words: the model writes end-of-padding (`TEXT_EPAD`, 0) before each word, so the pieces
between two 0s are one word, starting at the first 0's frame + 1 and ending at the next 0;
times are shifted back by the silence prefix and the delay. The last word ends at the end-of-stream
token or at most one second after it began. This is the rule of Kyutai's timestamp script
(`scripts/stt_from_file_pytorch.py`), applied online so words appear as they are recognised.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moshi_core.errors import InvalidParameterError, ModelSourceError
from moshi_core.formats.text import TEXT_EPAD, TEXT_PAD, TextTokenizer, Word
from moshi_core.inference.generate import GenerationState, LMGenerator
from moshi_core.inference.step_batch import StepBatch, lockstep_default
from moshi_core.loading.catalog import DEFAULT_STT_SOURCE
from moshi_core.loading.registry import MoshiModels, load_moshi
from moshi_core.models.mimi import MimiState
from moshi_core.params import SamplingParams

SUPPORTED_STT_MODELS = {
    "kyutai/stt-1b-en_fr": "English and French, 1 B parameters, 0.5 s delay, voice-activity heads (candle repo)",
    "kyutai/stt-2.6b-en": "English, 2.6 B parameters, 2.5 s delay",
}
TAIL_SECONDS = 1.0  # silence after the delay, so the last word gets its closing token
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class STTConfig:
    """`stt_config` of an STT repo's config.json."""

    audio_delay_seconds: float = 0.5
    audio_silence_prefix_seconds: float = 0.0

    @classmethod
    def from_config(cls, config: dict) -> "STTConfig":
        stt = config.get("stt_config") or {}
        return cls(
            audio_delay_seconds=float(stt.get("audio_delay_seconds", cls.audio_delay_seconds)),
            audio_silence_prefix_seconds=float(stt.get("audio_silence_prefix_seconds", cls.audio_silence_prefix_seconds)),
        )


def load_stt(source: str = DEFAULT_STT_SOURCE, **kwargs) -> MoshiModels:
    """`load_moshi` for a speech-to-text repo (its config.json says `model_type: stt`); its
    keyword arguments (`device`, `dtype`, `quantize="q8"`, ...) are `load_moshi`'s."""
    models = load_moshi(source, **kwargs)
    if models.config.get("model_type") != "stt" or models.lm.cfg.dep_q != 0:
        raise ModelSourceError(
            f"{source} is not a speech-to-text model (its config.json has no `model_type: stt`): "
            f"use one of {', '.join(SUPPORTED_STT_MODELS)}"
        )
    return models


class WordSegmenter:
    """Turns one stream of STT text tokens into timed words, one token (80 ms step) at a time."""

    def __init__(self, tokenizer: TextTokenizer, frame_rate: float, offset_seconds: float,
                 end_of_padding: int = TEXT_EPAD) -> None:
        self.tokenizer, self.frame_rate, self.offset = tokenizer, frame_rate, offset_seconds
        self.end_of_padding = end_of_padding  # the boundary between words
        self.eos = tokenizer.sp.eos_id()
        self.step = 0
        self._start: int | None = None  # the frame after the last end-of-padding
        self._pieces: list[tuple[int, int]] = []  # (frame, token) of the text tokens since then
        self._eos: int | None = None  # the frame of the first end-of-stream token since then
        self._flushed = False
        self.words: list[Word] = []

    def _time(self, frame: int) -> float:
        return max(0.0, frame / self.frame_rate - self.offset)

    def _close(self, end: int) -> list[Word]:
        """The words of the segment [start, end): several when the model wrote no 0 between them."""
        text = self.tokenizer.decode([token for frame, token in self._pieces if frame < end])
        names = text.split()
        start, words = self._start, []
        for name in names[:-1]:  # each gets as many frames as it has tokens
            n = len(self.tokenizer.encode(name))
            words.append(Word(name, self._time(start), self._time(start + n)))
            start += n
        if names:
            words.append(Word(names[-1], self._time(start), self._time(end)))
        self.words += words
        return words

    def push(self, token: int) -> list[Word]:
        """Add the next step's token; returns the words it completes."""
        frame, self.step = self.step, self.step + 1
        if token == self.end_of_padding:
            words = self._close(frame) if self._start is not None else []
            self._start, self._pieces, self._eos = frame + 1, [], None
            return words
        if self._start is not None:
            if token == self.eos and self._eos is None:
                self._eos = frame  # ends the last word only, should no boundary come after it
            elif token > TEXT_PAD:  # a control piece carries no text
                self._pieces.append((frame, token))
        return []

    def flush(self) -> list[Word]:
        """Close the last word once the stream is over (at the end-of-stream token, or at most one
        second after it began); returns every word."""
        if self._start is not None and not self._flushed:
            self._flushed = True
            end = self._eos if self._eos is not None else min(self.step, self._start + int(self.frame_rate))
            self._close(end)
        return self.words

    @property
    def pending(self) -> str:
        """The text of the word being recognised, for live display."""
        return "" if self._flushed else self.tokenizer.decode([token for _, token in self._pieces])


@dataclass
class TranscriptionState:
    mimi: MimiState
    lm: GenerationState
    words: list[WordSegmenter]

    def reset(self, mask: torch.Tensor, make_segmenter: Callable[[], WordSegmenter]) -> None:
        self.mimi.reset(mask)
        self.lm.reset(mask)
        for i, flag in enumerate(mask.tolist()):
            if flag:
                self.words[i] = make_segmenter()


@dataclass
class StepResult:
    tokens: torch.Tensor  # [B] text token of this step
    words: list[list[Word]]  # per stream, the words completed at this step
    pause: torch.Tensor  # [B, heads] probability that the speaker has stopped, per horizon (empty without heads)


@dataclass
class Transcript:
    words: list[Word]
    tokens: list[int] = field(repr=False)  # one per step, silence prefix and tail included
    duration: float = 0.0  # seconds of audio transcribed

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def to_dict(self) -> dict:
        return {"text": self.text, "duration": self.duration, "words": [w.to_dict() for w in self.words]}


class Transcriber:
    """Streaming transcription of several audio streams at once, 80 ms per step.

    A step of some of the streams computes only their rows, or (`lockstep`; None: on CUDA)
    every stream under an active mask, the static shape a compiled step replays; the numbers
    are the same either way."""

    def __init__(self, models: MoshiModels, sampling: SamplingParams | None = None,
                 lockstep: bool | None = None) -> None:
        self.models = models
        self.mimi, self.lm = models.mimi, models.lm
        self.config = STTConfig.from_config(models.config)
        self.frame_rate, self.frame_size = self.mimi.frame_rate, self.mimi.frame_size
        self.num_codebooks = self.lm.cfg.n_q
        self.generator = LMGenerator(self.lm, sampling or SamplingParams.from_config(models.generation_defaults),
                                     gpu_step=models.gpu_step)
        # The model's first step sees only its start tokens, never that step's audio: at least
        # one frame of silence leads, so no speech is lost.
        self.prefix_frames = max(1, math.ceil(self.config.audio_silence_prefix_seconds * self.frame_rate))
        self.tail_frames = math.ceil((self.config.audio_delay_seconds + TAIL_SECONDS) * self.frame_rate)
        self.offset_seconds = self.prefix_frames / self.frame_rate + self.config.audio_delay_seconds
        self.lockstep = lockstep_default(self.lm.device) if lockstep is None else lockstep

    def segmenter(self) -> WordSegmenter:
        return WordSegmenter(self.models.tokenizer, self.frame_rate, self.offset_seconds,
                             self.lm.cfg.existing_text_end_padding_id)

    def init_state(self, batch_size: int = 1) -> TranscriptionState:
        return TranscriptionState(
            self.mimi.init_state(batch_size), self.generator.init_state(batch_size),
            [self.segmenter() for _ in range(batch_size)],
        )

    def reset(self, state: TranscriptionState, mask: torch.Tensor) -> None:
        """Start new streams in the slots of `mask`; the others go on."""
        state.reset(mask, self.segmenter)

    @torch.inference_mode()
    def step(self, pcm: torch.Tensor, state: TranscriptionState, rows: list[int] | None = None) -> StepResult:
        """One 80 ms frame per stream, pcm [B, 1, 1920] at 24 kHz (lead each stream with
        `silence(prefix_frames)`, and follow it with `silence(tail_frames)` to finish it).
        With `rows`, pcm holds the next frame of those streams of `state` only (in that order)."""
        batch = self._batch(state, rows)
        codes = self.mimi.encode_step(batch.inputs(pcm).to(self.mimi.device), state.mimi, self.num_codebooks,
                                      batch.rows(self.mimi.device), batch.active(self.mimi.device))
        return self._step_codes(batch.outputs(codes).to(self.lm.device), state, rows)

    def _batch(self, state: TranscriptionState, rows: list[int] | None) -> StepBatch:
        return StepBatch(list(range(len(state.words))) if rows is None else rows, len(state.words), self.lockstep)

    def _step_codes(self, codes: torch.Tensor, state: TranscriptionState, rows: list[int] | None = None) -> StepResult:
        batch = self._batch(state, rows)
        out, heads = self.generator.step_with_extra_heads(batch.inputs(codes), state.lm, batch.rows(self.lm.device),
                                                          batch.active(self.lm.device))
        out, heads = batch.outputs(out), batch.outputs(heads)
        tokens = out[:, 0]
        segmenters = state.words if rows is None else [state.words[r] for r in rows]
        words = [seg.push(t) for seg, t in zip(segmenters, tokens.tolist())]
        return StepResult(tokens, words, heads[..., 0])

    def silence(self, frames: int, batch_size: int = 1) -> torch.Tensor:
        return torch.zeros(batch_size, 1, frames * self.frame_size, device=self.mimi.device)

    @torch.inference_mode()
    def transcribe(
        self, wavs: list[torch.Tensor], progress: Progress | None = None,
        on_words: Callable[[int, list[Word]], None] | None = None,
    ) -> list[Transcript]:
        """Whole files, 24 kHz mono [1, T] each, as one batch; `on_words(item, words)` as they come."""
        if not wavs:
            raise InvalidParameterError("no audio to transcribe")
        lengths = [w.shape[-1] for w in wavs]
        frames = -(-max(lengths) // self.frame_size)
        total = self.prefix_frames + frames + self.tail_frames
        batch = self.silence(total, len(wavs))
        start = self.prefix_frames * self.frame_size
        for i, w in enumerate(wavs):
            batch[i, :, start : start + w.shape[-1]] = w.to(batch.device)
        codes = self.mimi.encode(batch, self.num_codebooks).to(self.lm.device)
        state = self.init_state(len(wavs))
        tokens = []
        for t in range(total):
            result = self._step_codes(codes[..., t : t + 1], state)
            tokens.append(result.tokens)
            if on_words is not None:
                for i, words in enumerate(result.words):
                    if words:
                        on_words(i, words)
            if progress is not None:
                progress(t + 1, total)
        steps = torch.stack(tokens, dim=1).tolist()
        transcripts = []
        for i, seg in enumerate(state.words):
            before = len(seg.words)
            words = seg.flush()
            if on_words is not None and len(words) > before:
                on_words(i, words[before:])
            transcripts.append(Transcript(words=words, tokens=steps[i], duration=lengths[i] / self.mimi.sample_rate))
        return transcripts


class LiveTranscription:
    """One live stream: 24 kHz audio in chunks of any length, words out as they are recognised."""

    def __init__(self, transcriber: Transcriber) -> None:
        self.transcriber = transcriber
        self.state = transcriber.init_state(1)
        self.words: list[Word] = []
        self._buffer = transcriber.silence(transcriber.prefix_frames)[0]  # [1, T]

    def feed(self, pcm: torch.Tensor) -> list[Word]:
        """pcm [1, T] (mono, 24 kHz): the words this audio completes."""
        t = self.transcriber
        self._buffer = torch.cat([self._buffer, pcm.to(self._buffer)], dim=-1)
        new: list[Word] = []
        while self._buffer.shape[-1] >= t.frame_size:
            frame, self._buffer = self._buffer[:, : t.frame_size], self._buffer[:, t.frame_size :]
            for words in t.step(frame[None], self.state).words:
                new += words
        self.words += new
        return new

    def finish(self) -> list[Word]:
        """The end of the stream: the silence the model needs to catch up, then the last word."""
        new = self.feed(self.transcriber.silence(self.transcriber.tail_frames)[0])
        segmenter = self.state.words[0]
        before = len(segmenter.words)
        last = segmenter.flush()[before:]
        self.words += last
        return new + last

    @property
    def text(self) -> str:
        pending = self.state.words[0].pending
        return " ".join([w.text for w in self.words] + ([pending] if pending else []))
