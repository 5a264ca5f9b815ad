"""Mimi: 24 kHz audio <-> 12.5 Hz codes (up to 32 codebooks of 2048 entries).

encode: SEANet encoder (25 Hz) -> transformer -> conv downsample x2 (12.5 Hz) -> split RVQ.
decode: split RVQ -> depthwise transposed conv upsample x2 -> transformer -> SEANet decoder.

Offline, `encode` right-pads the audio with zeros to a whole number of 1920-sample frames
(the last partial frame becomes one more code frame) and `decode` returns
`1920 * frames` samples; callers that know the source length trim to it (the token file
stores it). Streaming works on whole frames: one frame in, one code frame out, and back.
A server steps some of its streams with `rows`, or all of them in lockstep with an `active`
mask (one static shape: the step compiles into one graph, see `encode_step`).

Offline runs the streaming code over chunks of 10 s, the layers above 200 Hz over pieces of
1.44 s of them (`OFFLINE_CHUNK_FRAMES`, `HIGH_RATE_FRAMES`): memory stays bounded for any
file length, progress can be reported, and offline and streaming are one code path (every
layer's streaming state reproduces exactly what the layer sees offline).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moshi_core.errors import InvalidParameterError
from moshi_core.nn.conv import CausalConv, StreamingConv1d, StreamingConvTranspose1d
from moshi_core.nn.rvq import QuantizerConfig, ResidualVectorQuantizer, SplitResidualVectorQuantizer
from moshi_core.nn.seanet import SeanetConfig, SeanetDecoder, SeanetEncoder
from moshi_core.nn.streaming import ResettableFields, StateGroup, active_of, rows_of
from moshi_core.nn.transformer import KVCache, ProjectedTransformer, TransformerConfig

# Offline, the transformers and the layers at 200 Hz and below take passes of 10 s (matrix
# products of 250 rows run up to twice as fast as of 100), and the layers above 200 Hz
# passes of 1.44 s (their activations, 9 MB at 24 kHz, then stay in the caches). Encoding
# 10 s took 0.645 s with one size for all (4 s, the best such size), 0.53 s so (a 2-core
# Xeon, one run; decoding 0.60 -> 0.46 s). The codes are the same either way.
OFFLINE_CHUNK_FRAMES = 125
HIGH_RATE_FRAMES = 18
Progress = Callable[[int, int], None]  # (frames done, frames in all)


@dataclass
class MimiConfig:
    """Kyutai's `_mimi_config` (official values as defaults), plus how many codebooks to use."""

    sample_rate: int = 24000
    channels: int = 1
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(input_dimension=512, output_dimensions=(512,))
    )
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    num_codebooks: int = 8

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MimiConfig":
        data = dict(data)
        sub = {
            "seanet": SeanetConfig, "transformer": TransformerConfig, "quantizer": QuantizerConfig,
        }
        for key, kind in sub.items():
            if key in data and isinstance(data[key], dict):
                data[key] = kind(**data[key])
        return cls(**data)

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def resample_stride(self) -> int:
        return int(self.encoder_frame_rate / self.frame_rate)


class ConvDownsample1d(nn.Module):
    """Learnt causal strided conv from the encoder rate to the frame rate."""

    def __init__(self, stride: int, dim: int) -> None:
        super().__init__()
        self.conv = StreamingConv1d(dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvTrUpsample1d(nn.Module):
    """Learnt depthwise transposed conv from the frame rate to the encoder rate."""

    def __init__(self, stride: int, dim: int) -> None:
        super().__init__()
        self.convtr = StreamingConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)


@dataclass
class MimiEncoderState(ResettableFields):
    seanet: StateGroup
    transformer: KVCache
    downsample: Any


@dataclass
class MimiDecoderState(ResettableFields):
    upsample: Any
    transformer: KVCache
    seanet: StateGroup


@dataclass
class MimiState(ResettableFields):
    """Streaming state of both directions for a batch of independent streams."""

    encoder: MimiEncoderState
    decoder: MimiDecoderState
    max_frames: int  # frames processed per pass; longer calls are split

    @property
    def batch_size(self) -> int:
        return self.encoder.transformer.offset.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step updates in place (the convs' histories, the transformers' caches)."""
        caches = (self.encoder.transformer, self.decoder.transformer)
        convs = StateGroup([self.encoder.seanet, self.encoder.downsample, self.decoder.upsample, self.decoder.seanet])
        return [*convs.tensors(), *(t for c in caches for t in c.tensors())]


class MimiModel(nn.Module):
    def __init__(self, cfg: MimiConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MimiConfig()
        self.cfg = cfg
        dim = cfg.seanet.dimension
        self.encoder = SeanetEncoder(cfg.seanet)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.encoder_transformer = ProjectedTransformer(cfg.transformer)
        self.decoder_transformer = ProjectedTransformer(cfg.transformer)
        self.downsample = ConvDownsample1d(cfg.resample_stride, dim)
        self.upsample = ConvTrUpsample1d(cfg.resample_stride, dim)
        self.quantizer = SplitResidualVectorQuantizer(cfg.quantizer)
        self.num_codebooks = cfg.num_codebooks
        self.checkpoint_id = "random-init"  # set by the loader; recorded in token files
        # The lockstep steps (`active` mask) once compiled (`compile_steps`): "encode", "decode".
        self._lockstep: dict[str, Callable] = {}
        self._static_state = False  # states are marked as fixed addresses, for CUDA graphs

    # -- properties -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.downsample.conv.conv.conv.weight.device

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.frame_rate

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @num_codebooks.setter
    def num_codebooks(self, n: int) -> None:
        self._num_codebooks = self._codebooks_to_use(n)

    def _codebooks_to_use(self, n: int | None) -> int:
        if n is None:
            return self._num_codebooks
        total = self.cfg.quantizer.n_q
        if not isinstance(n, int) or not 1 <= n <= total:
            raise InvalidParameterError(f"the number of codebooks must be between 1 and {total}, not {n}")
        return n

    @property
    def _steps_per_frame(self) -> int:
        return self.cfg.resample_stride

    # -- offline ----------------------------------------------------------------------------

    def encode(
        self, wav: torch.Tensor, num_codebooks: int | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        """wav [B, 1, T] float in [-1, 1] -> codes [B, K, ceil(T / 1920)] int64.

        K is `num_codebooks`, by default the model's `num_codebooks`.
        """
        self._check_audio(wav)
        wav = F.pad(wav, (0, -wav.shape[-1] % self.frame_size))
        state = self.init_state(wav.shape[0], max_frames=OFFLINE_CHUNK_FRAMES)

        def step(chunk: torch.Tensor, state: MimiState) -> torch.Tensor:
            return self.encode_step(chunk, state, num_codebooks)

        return self._in_chunks(step, wav, self.frame_size, state, progress)

    def decode(self, codes: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """codes [B, K, F] -> wav [B, 1, 1920 * F]."""
        self._check_codes(codes)
        state = self.init_state(codes.shape[0], max_frames=OFFLINE_CHUNK_FRAMES)
        return self._in_chunks(self.decode_step, codes, 1, state, progress)

    @staticmethod
    def _in_chunks(step, x: torch.Tensor, frame: int, state: "MimiState", progress: Progress | None):
        total = x.shape[-1] // frame
        outputs = []
        for chunk in x.split(state.max_frames * frame, dim=-1):
            outputs.append(step(chunk, state))
            if progress is not None:
                progress(min(len(outputs) * state.max_frames, total), total)
        return torch.cat(outputs, dim=-1)

    # -- streaming --------------------------------------------------------------------------

    def compile_steps(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Compile the lockstep streaming steps (`encode_step`/`decode_step` with an `active`
        mask) into one graph each; the other calls stay eager. `mode="reduce-overhead"`
        replays them as CUDA graphs: the states made from now on keep fixed addresses."""
        options = {"fullgraph": True, "backend": backend, "mode": mode}
        self._lockstep = {"encode": torch.compile(self._encode_step, **options),
                          "decode": torch.compile(self._decode_step, **options)}
        self._static_state = mode == "reduce-overhead"

    @property
    def compiled(self) -> bool:
        """Whether the lockstep steps are compiled (`compile_steps`): engines warm them up at build."""
        return bool(self._lockstep)

    @torch.inference_mode()
    def warm_up(self, state: "MimiState", num_codebooks: int, decoded: int | None = None, steps: int = 2) -> float:
        """Run the lockstep steps a few times on an engine's own `state` (encoding
        `num_codebooks`; decoding `decoded` codebooks, unless None), then reset it: the
        compilation and CUDA-graph capture (a graph per state) happen now, at load, not in a
        user's first step. Returns the seconds taken."""
        start = time.perf_counter()
        active = torch.ones(state.batch_size, dtype=torch.bool, device=self.device)
        wav = torch.zeros(state.batch_size, 1, self.frame_size, device=self.device)
        codes = torch.zeros(state.batch_size, decoded or 1, 1, dtype=torch.long, device=self.device)
        for _ in range(steps):
            self.encode_step(wav, state, num_codebooks, active=active)
            if decoded is not None:
                self.decode_step(codes, state, active=active)
        state.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def init_state(self, batch_size: int = 1, max_frames: int = 1) -> MimiState:
        """State for `batch_size` independent streams; `max_frames` is the size of one pass.

        Weights derived from the parameters (the quantizer's tables, the convs' re-laid-out
        taps) are built here, before any step: built inside a compiled step, they would change
        what the compiled graph guards on and the next step would compile again.
        """
        for module in self.modules():
            if isinstance(module, (CausalConv, ResidualVectorQuantizer)):
                module.derive_weights()
        steps = self._steps_per_frame * max_frames
        state = MimiState(
            encoder=MimiEncoderState(
                seanet=self.encoder.init_state(batch_size),
                transformer=self.encoder_transformer.init_state(batch_size, steps),
                downsample=self.downsample.conv.init_state(batch_size),
            ),
            decoder=MimiDecoderState(
                upsample=self.upsample.convtr.init_state(batch_size),
                transformer=self.decoder_transformer.init_state(batch_size, steps),
                seanet=self.decoder.init_state(batch_size),
            ),
            max_frames=max_frames,
        )
        if self._static_state:
            for tensor in state.tensors():
                torch._dynamo.mark_static_address(tensor)
        return state

    def encode_step(self, wav: torch.Tensor, state: MimiState, num_codebooks: int | None = None,
                    rows: torch.Tensor | None = None, active: torch.Tensor | None = None) -> torch.Tensor:
        """wav [B, 1, n * 1920] -> codes [B, K, n], continuing the streams in `state`.

        With `rows` [A], wav holds the next audio of the state's streams `rows` only; the other
        streams are left as they are (a live server steps only its conversations in progress).
        With `active` [B] bool instead, every stream computes and only the active ones advance
        (the lockstep step: static shapes, no host sync, so one compiled graph serves any set
        of conversations); the codes of inactive streams are meaningless, for callers to ignore.
        """
        self._check_audio(wav)
        self._check_batch(wav, state, rows, active)
        num_codebooks = self._codebooks_to_use(num_codebooks)
        if wav.shape[-1] % self.frame_size:
            raise InvalidParameterError(
                f"streaming encode takes whole frames of {self.frame_size} samples, "
                f"got {wav.shape[-1]}; buffer the remainder until the next call"
            )
        step = self._lockstep.get("encode", self._encode_step) if active is not None else self._encode_step
        return step(wav, state, num_codebooks, rows, active)

    def _encode_step(self, wav: torch.Tensor, state: MimiState, num_codebooks: int, rows: torch.Tensor | None,
                     active: torch.Tensor | None) -> torch.Tensor:
        st = state.encoder
        convs = StateGroup([st.seanet, st.downsample])
        codes = []
        with rows_of(convs, rows) as part, active_of(convs, active):
            seanet, downsample = part.children
            for piece in wav.split(state.max_frames * self.frame_size, dim=-1):
                audio = piece.transpose(1, 2)  # [B, T, 1]
                if piece.shape[-1] <= HIGH_RATE_FRAMES * self.frame_size:
                    latent = self.encoder.step(audio, seanet)  # [B, 2n, 512]
                else:
                    latent = _in_passes(lambda x: self.encoder.step(x, seanet, self.encoder.head), audio,
                                        HIGH_RATE_FRAMES * self.frame_size)
                    latent = self.encoder.step(latent, seanet, self.encoder.tail)
                latent = self.encoder_transformer.step(latent, st.transformer, rows, active)
                latent = self.downsample.conv.step(latent, downsample)
                codes.append(self.quantizer.encode(latent, num_codebooks))
        return torch.cat(codes, dim=-1)

    def decode_step(self, codes: torch.Tensor, state: MimiState, rows: torch.Tensor | None = None,
                    active: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, K, n] -> wav [B, 1, n * 1920], continuing the streams in `state` (the
        streams `rows` [A] only, or all with only `active` [B] ones advancing: see `encode_step`).
        Inactive streams still look their codes up: give them valid ones (zeros, say)."""
        self._check_codes(codes)
        self._check_batch(codes, state, rows, active)
        step = self._lockstep.get("decode", self._decode_step) if active is not None else self._decode_step
        return step(codes, state, rows, active)

    def _decode_step(self, codes: torch.Tensor, state: MimiState, rows: torch.Tensor | None,
                     active: torch.Tensor | None) -> torch.Tensor:
        st = state.decoder
        convs = StateGroup([st.upsample, st.seanet])
        pieces = []
        with rows_of(convs, rows) as part, active_of(convs, active):
            upsample, seanet = part.children
            for piece in codes.split(state.max_frames, dim=-1):
                latent = self.upsample.convtr.step(self.quantizer.decode(piece), upsample)
                latent = self.decoder_transformer.step(latent, st.transformer, rows, active)
                frames = piece.shape[-1]
                if frames <= HIGH_RATE_FRAMES:
                    audio = self.decoder.step(latent, seanet)
                else:
                    latent = self.decoder.step(latent, seanet, self.decoder.head)  # at 200 Hz
                    audio = _in_passes(lambda x: self.decoder.step(x, seanet, self.decoder.tail), latent,
                                       HIGH_RATE_FRAMES * (latent.shape[1] // frames))
                pieces.append(audio.transpose(1, 2))  # -> [B, 1, 1920 n]
        return torch.cat(pieces, dim=-1)

    # -- validation -------------------------------------------------------------------------

    @staticmethod
    def _check_batch(x: torch.Tensor, state: MimiState, rows: torch.Tensor | None,
                     active: torch.Tensor | None) -> None:
        if active is not None and (rows is not None or active.shape != (state.batch_size,)
                                   or active.dtype != torch.bool):
            raise InvalidParameterError(f"`active` must be [{state.batch_size}] bool, without `rows`")
        expected = state.batch_size if rows is None else rows.shape[0]
        if x.shape[0] != expected:
            what = f"the {expected} streams stepped" if rows is not None else f"a state of {expected} streams"
            raise InvalidParameterError(f"batch of {x.shape[0]} for {what}")

    def _check_audio(self, wav: torch.Tensor) -> None:
        if wav.dim() != 3 or wav.shape[1] != self.cfg.channels:
            raise InvalidParameterError(f"audio must be [batch, {self.cfg.channels}, samples], got {list(wav.shape)}")
        if wav.shape[-1] == 0:
            raise InvalidParameterError("audio is empty")

    def _check_codes(self, codes: torch.Tensor) -> None:
        total = self.cfg.quantizer.n_q
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= total or codes.shape[-1] == 0:
            raise InvalidParameterError(f"codes must be [batch, 1..{total}, frames>0], got {list(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise InvalidParameterError(f"codes must be integers, got {codes.dtype}")


def _in_passes(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, length: int) -> torch.Tensor:
    """step over x [B, T, C] in pieces of `length` steps, joined (a streaming step continues
    from one piece to the next)."""
    return torch.cat([step(piece) for piece in x.split(length, dim=1)], dim=1)
