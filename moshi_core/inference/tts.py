"""Text-to-speech with Kyutai's TTS models (`kyutai/tts-1.6b-en_fr`), streamed frame by frame.

The TTS model is the Moshi architecture with the streams turned around:
the text leads and the audio follows `delay_steps` frames behind (1.28 s), the voice is
given as speaker embeddings the transformer cross-attends to, and CFG is distilled into a
`cfg` setting summed into the input. Each 80 ms step:

1. the temporal transformer reads the previous step's text and audio tokens;
2. the model samples a text token, which only says "a word starts" or "pad": `TextFeed`
   turns it into the token actually fed (the next piece of the current word, ...);
3. the depth transformer samples the audio codebooks of the step (skipped while the audio
   is still all in the delay, where every audio token is "none", -1);
4. once the audio delay has passed, Mimi decodes one frame of PCM.

`TTSSession` runs a batch of requests side by side (each its own voice, text and seed) and
yields audio as it is made; `synthesize` collects it. A request whose audio is complete stops
stepping while the others go on: its rows are dropped from the steps (the default), or
(`lockstep`) stepped under an active mask that keeps its state still; the outputs are the
same. Rows are the default on CUDA too: a TTS step reads its sampled tokens on the host (the
text feed) and each session has a state of its own, so no one graph replays its steps.
"""

import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from moshi_core.errors import CheckpointError, InvalidParameterError, ModelSourceError
from moshi_core.formats.text import TEXT_PAD, TextTokenizer, Word
from moshi_core.inference.generate import depth_step
from moshi_core.inference.sampling import SlotSampling
from moshi_core.inference.step_batch import StepBatch
from moshi_core.inference.tts_script import Fed, FeedRules, Say, TextFeed, build_script
from moshi_core.loading.catalog import DEFAULT_TTS_SOURCE, DEFAULT_VOICE, DEFAULT_VOICE_REPO
from moshi_core.loading.files import read_config
from moshi_core.loading.hub import parse_source
from moshi_core.loading.registry import load_moshi
from moshi_core.loading.tts_info import TTSInfo, voice_repo
from moshi_core.loading.voices import VoiceRepo, load_voice, speakers_tensor
from moshi_core.models.lm import ZERO_TOKEN, LMModel
from moshi_core.models.mimi import MimiModel
from moshi_core.nn.conditioners import fuse
from moshi_core.params import TTSParams

SKIPPED_FRAMES = 2  # Kyutai drops the first two decoded frames (a click at the start)


@dataclass
class TTSConfig:
    """The `tts_config` block of a TTS repo's `config.json` (official keys)."""

    audio_delay: float = 1.28  # seconds by which the audio follows the text
    second_stream_ahead: int = 0  # look-ahead of the second text stream, in words
    multistream: bool = False
    max_speakers: int = 5

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TTSConfig":
        """Refuses keys it does not know, and multistream models (two voices out)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown tts_config keys: {', '.join(unknown)}")
        config = cls(**data)
        if config.multistream:
            raise ValueError("multistream TTS models (two voices out) are not supported")
        return config


@dataclass
class TTSRequest:
    text: str | list[str]  # a text, or the turns of a dialogue (main speaker first)
    voice: str | None = None  # a voice name or hf:// URI of the voice repo (None: the default)
    params: TTSParams = field(default_factory=TTSParams)
    allow_voice_paths: bool = False  # also local .safetensors and any hf:// URI: the CLI's own user

    def turns(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


@dataclass
class TTSModel:
    """A TTS model loaded once and shared by every request."""

    lm: LMModel
    mimi: MimiModel
    tokenizer: TextTokenizer
    config: TTSConfig
    voices: VoiceRepo
    source: str

    @property
    def delay_steps(self) -> int:
        return int(self.config.audio_delay * self.mimi.frame_rate)

    @property
    def multi_speaker(self) -> bool:
        provider = self.lm.condition_provider
        return provider is not None and "speaker_wavs" in provider.conditioners

    @property
    def cfg_values(self) -> list[float]:
        """The CFG strengths the model was distilled with ([] for a model without)."""
        lut = self.lm.condition_provider.lut("cfg") if self.lm.condition_provider is not None else None
        return sorted(float(v) for v in lut.values) if lut is not None else []

    def text_feed(self, request: TTSRequest) -> TextFeed:
        """The request's script, ready to be fed (invalid breaks and empty texts refused)."""
        params = request.params
        entries = build_script(self.tokenizer, request.turns(), self.mimi.frame_rate, self.multi_speaker,
                               params.padding_between)
        if not any(isinstance(e, Say) for e in entries):
            raise InvalidParameterError("the text has no words to say")
        return TextFeed(entries, FeedRules(self.config.second_stream_ahead, params.max_padding,
                                           params.initial_padding))

    def text_input(self, fed: Fed) -> int:
        """The text token the model reads: with a look-ahead stream, both streams in one,
        (second + 1) * card + main, which the model's text embedding splits again."""
        if not self.config.second_stream_ahead:
            return fed.main
        second = ZERO_TOKEN if fed.second is None else fed.second
        return (second + 1) * (self.lm.cfg.text_card + 1) + fed.main


def load_tts(
    source: str | os.PathLike = DEFAULT_TTS_SOURCE,
    *,
    voices: str | os.PathLike = DEFAULT_VOICE_REPO,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
    quantize: str | None = None,
) -> TTSModel:
    """A TTS model from a repo id, hf:// URI or folder laid out like `kyutai/tts-1.6b-en_fr`;
    `quantize="q8"` makes its LM's matrices 8-bit as they load (the conditioners stay float32)."""
    config = read_config(parse_source(source, revision), revision)
    if "tts_config" not in config:
        raise ModelSourceError(f"{source} is not a TTS model: its config.json has no tts_config")
    try:
        tts_config = TTSConfig.from_dict(config["tts_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the tts_config of {source} is not supported: {exc}") from exc
    models = load_moshi(source, device=device, dtype=dtype, revision=revision, quantize=quantize)
    if models.lm.cfg.n_q != models.lm.cfg.dep_q:
        raise CheckpointError(f"{source}: a TTS model generates all its audio streams (n_q == dep_q)")
    return TTSModel(models.lm, models.mimi, models.tokenizer, tts_config, voice_repo(config, voices), str(source))


# -- generation ------------------------------------------------------------------------------


@dataclass
class TTSChunk:
    """New output of one request: 80 ms of audio (empty on a closing chunk)."""

    request: int
    pcm: torch.Tensor  # [1920] float32 in [-1, 1], 24 kHz
    done: bool = False  # the request's last chunk


@dataclass
class _Request:
    feed: TextFeed
    params: TTSParams
    done: bool = False


class TTSSession:
    """A batch of requests generated together, step by step.

    `stream()` yields `TTSChunk`s as frames are decoded; `words(i)` and `end_step(i)` tell
    what request i said when. Requests in one batch do not influence each other: each has
    its own conditions, cache rows and random generator.
    """

    def __init__(self, model: TTSModel, requests: list[TTSRequest], lockstep: bool = False) -> None:
        """`lockstep`: finished requests' rows step masked instead of being dropped."""
        if not requests:
            raise InvalidParameterError("nothing to synthesize")
        # Distilled CFG only: classic CFG (a second, unconditioned batch) is not run, as Kyutai
        # refuses it for these models.
        info = TTSInfo(model.voices, model.cfg_values)
        for r in requests:
            info.check_cfg(r.params.cfg_coef)
        self.model, self.requests = model, requests
        lm, B = model.lm, len(requests)
        self.items = [_Request(model.text_feed(r), r.params) for r in requests]
        self.sampling = SlotSampling(B, lm.device)
        for i, r in enumerate(requests):
            self.sampling.configure(i, r.params.sampling(), r.params.seed)
        self.cache = lm.init_state(B)
        self.condition_sum = self._set_conditions()
        K = lm.cfg.num_codebooks
        self.delays = torch.tensor(lm.cfg.delays, device=lm.device)
        self.max_delay = max(lm.cfg.delays)
        self.previous = torch.full((B, K), ZERO_TOKEN, dtype=torch.long, device=lm.device)
        self.history: deque[torch.Tensor] = deque(maxlen=self.max_delay + 1)  # last generated columns
        self.step_index = 0
        self.frames: list[torch.Tensor] = []  # every completed frame [B, 1 + dep_q], for inspection
        self.mimi_state = model.mimi.init_state(B)
        self.max_steps = max(r.params.max_steps for r in requests)
        self.lockstep = lockstep
        self.padding_bonus = torch.tensor([r.params.padding_bonus for r in requests], device=lm.device)

    # -- conditions ----------------------------------------------------------------------

    def _set_conditions(self) -> torch.Tensor | None:
        """Embed voices and settings; set the cross-attention source; return the summed part."""
        lm = self.model.lm
        provider = lm.condition_provider
        if provider is None:
            return None
        values: dict[str, Any] = {}
        for name, conditioner in provider.conditioners.items():
            if name == "speaker_wavs":
                values[name] = self._voices(conditioner.dim)
            elif name == "cfg":
                values[name] = [format(r.params.cfg_coef, ".1f") for r in self.requests]
            elif name == "control":
                values[name] = ["ok"] * len(self.requests)  # the only value Kyutai's model knows
            else:
                raise CheckpointError(f"the TTS model's condition {name!r} is not supported")
        with torch.no_grad():
            conditions = provider.embed(values)
            total, cross = fuse(lm.fuser, conditions)
            if cross is not None:
                lm.transformer.set_cross_source(self.cache, cross.to(lm.dtype))
        return total.to(lm.dtype) if total is not None else None

    def _voices(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's voice -> [B, speakers * T, dim] and its mask [B, speakers * T]."""
        model = self.model
        paths = [model.voices.path(r.voice or DEFAULT_VOICE, allow_paths=r.allow_voice_paths) for r in self.requests]
        rows = [speakers_tensor([load_voice(p)], model.config.max_speakers, dim) for p in paths]
        length = max(t.shape[0] for t, _ in rows)
        tensor = torch.zeros(len(rows), length, dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (t, m) in enumerate(rows):
            tensor[i, : t.shape[0]], mask[i, : m.shape[0]] = t, m
        device = model.lm.device
        return tensor.to(device), mask.to(device)

    # -- one step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> torch.Tensor | None:
        """One 80 ms step of the LM. Returns the frame it completes, [B, 1 + dep_q] with the
        delays undone (text, then audio codes), or None while the delays fill."""
        lm, t = self.model.lm, self.step_index
        batch = self._batch()
        rows, active = batch.rows(lm.device), batch.active(lm.device)
        requests = list(range(len(self.items))) if rows is None else batch.slots  # of the step's rows
        first = t <= self.delays  # [K]: streams still on their start token
        inputs = torch.where(first, lm.initial_tokens(len(requests))[..., 0], batch.take(self.previous))
        condition_sum = None if self.condition_sum is None else batch.take(self.condition_sum)
        z, text_logits = lm.forward_text(inputs[..., None], self.cache, condition_sum, rows, active)
        logits = text_logits[:, 0, 0].float()
        logits[:, TEXT_PAD] += batch.take(self.padding_bonus)
        sampled = self.sampling.sample(logits, True, rows, active).tolist()
        # A finished request's feed is over: its masked row reads its last token again.
        fed = [int(self.previous[i, 0]) if self.items[i].done else self.model.text_input(self.items[i].feed.next(t, s))
               for i, s in zip(requests, sampled)]
        text = torch.tensor(fed, dtype=torch.long, device=lm.device)
        if t < self.model.delay_steps:  # the audio is all in the delay: no depth transformer
            audio = torch.full((len(requests), lm.cfg.dep_q), ZERO_TOKEN, dtype=torch.long, device=lm.device)
        else:
            audio = depth_step(lm, text, z, lambda logits: self.sampling.sample(logits.float(), False, rows, active))
        # Audio positions before the delay are "none", even where the depth step sampled them.
        audio = torch.where(t < self.delays[1:] + self.model.delay_steps, ZERO_TOKEN, audio)
        self.previous = batch.put(self.previous, torch.cat([text[:, None], audio], dim=1))
        self.history.append(self.previous)
        self.step_index += 1
        if t < self.max_delay:
            return None
        # Stream k of frame t - max_delay was generated delays[k] steps after its start.
        frame = torch.stack([self.history[d][:, k] for k, d in enumerate(self.delays.tolist())], dim=1)
        self.frames.append(frame)
        return frame

    def _batch(self) -> StepBatch:
        """The step of the requests still speaking."""
        return StepBatch([i for i, item in enumerate(self.items) if not item.done], len(self.items), self.lockstep)

    # -- audio out -----------------------------------------------------------------------

    def end_step(self, i: int) -> int | None:
        return self.items[i].feed.end_step

    def words(self, i: int) -> list[Word]:
        """Request i's words with times in its audio (the first skipped frames taken off)."""
        item, rate = self.items[i], self.model.mimi.frame_rate
        steps = item.feed.word_steps
        end = item.feed.end_step if item.feed.end_step is not None else self.step_index
        starts = [s for _, s in steps] + [end]

        def time(step: int) -> float:
            return max(0, step - SKIPPED_FRAMES) / rate

        return [Word(text, time(s), time(max(s + 1, starts[j + 1]))) for j, (text, s) in enumerate(steps)]

    def finished(self) -> bool:
        return all(item.done for item in self.items) or self.step_index >= self.max_steps

    @torch.no_grad()
    def stream(self, on_step: Callable[[int], None] | None = None) -> Iterator[TTSChunk]:
        """Run to the end, yielding each request's audio 80 ms at a time as it is decoded."""
        mimi, delay = self.model.mimi, self.model.delay_steps
        while not self.finished():
            frame = self.step()
            if on_step is not None:
                on_step(self.step_index)
            if frame is None:
                continue
            index = self.step_index - 1 - self.max_delay - delay  # frame number in the audio
            if index < 0:
                continue
            batch = self._batch()
            codes = batch.take(frame[:, 1:, None])
            pcm = mimi.decode_step(codes, self.mimi_state, batch.rows(mimi.device), batch.active(mimi.device))
            pcm = batch.put(pcm.new_zeros(len(self.items), *pcm.shape[1:]), pcm)
            yield from self._emit(index, pcm.clamp(-1, 1)[:, 0])
        for i, item in enumerate(self.items):  # ran out of steps: close what is open
            if not item.done:
                item.done = True
                yield TTSChunk(i, torch.zeros(0), True)

    def _emit(self, index: int, pcm: torch.Tensor) -> Iterator[TTSChunk]:
        """Frame `index` of every request still speaking. A request's audio is frames
        [SKIPPED_FRAMES, end_step + SKIPPED_FRAMES), as in Kyutai's `simple_generate`; its end
        step is always known by the time its last frame is decoded (delay_steps later)."""
        if index < SKIPPED_FRAMES:
            return
        for i, item in enumerate(self.items):
            if item.done:
                continue
            end = item.feed.end_step
            item.done = end is not None and index >= end + SKIPPED_FRAMES - 1
            yield TTSChunk(i, pcm[i], item.done)


@dataclass
class TTSResult:
    pcm: torch.Tensor  # [samples] float32, 24 kHz
    words: list[Word]
    complete: bool  # False when max_steps stopped it before the end of the text


def synthesize(model: TTSModel, requests: list[TTSRequest],
               on_step: Callable[[int], None] | None = None) -> list[TTSResult]:
    """Every request's whole audio and timed words."""
    session = TTSSession(model, requests)
    pieces: list[list[torch.Tensor]] = [[] for _ in requests]
    for chunk in session.stream(on_step):
        pieces[chunk.request].append(chunk.pcm)
    return [
        TTSResult(torch.cat(p) if p else torch.zeros(0), session.words(i), session.end_step(i) is not None)
        for i, p in enumerate(pieces)
    ]
