"""The Moshi language model: a temporal transformer over parallel token streams and a depth
transformer that predicts the audio codebooks of each frame one after the other.

Streams (`num_codebooks = n_q + 1`): text first, then `n_q` audio codebooks; for Moshi the
first `dep_q = 8` are Moshi's own voice (predicted) and the last 8 the user's (listened to).
Each stream k is shifted `delays[k]` steps later inside the model. Token -1 embeds to zero.

Module names mirror Kyutai's checkpoints, so `model.safetensors` loads unchanged.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import nn

from moshi_core.formats.text import TEXT_EPAD, TEXT_PAD
from moshi_core.kernels.linear import Linear
from moshi_core.nn.conditioners import ConditionProvider, FuserConfig
from moshi_core.nn.transformer import KVCache, Transformer, TransformerConfig, make_norm

ZERO_TOKEN = -1  # embeds to an exact zero: "no input"
UNGENERATED_TOKEN = -2  # placeholder for "to be sampled", never embedded


@dataclass
class LMConfig:
    """`LMModel` options under Kyutai's config keys (`configs/moshi_7b_202409.json`, the HF
    repos' `config.json`). Defaults are the reference constructor's; `MOSHI_7B` is the preset
    the Moshi repos use when they ship no `config.json`."""

    dim: int = 128
    text_card: int = 32000
    n_q: int = 8
    dep_q: int = 8
    card: int = 1024
    num_heads: int = 8
    num_layers: int = 6
    hidden_scale: float = 4
    causal: bool = True
    layer_scale: float | None = None
    context: int | None = None
    max_period: float = 10000
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "sin"
    delays: list[int] = field(default_factory=lambda: [0])
    text_card_out: int | None = None
    existing_text_padding_id: int = TEXT_PAD
    existing_text_end_padding_id: int = TEXT_EPAD
    norm_emb: bool = False
    bias_proj: bool = False
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    demux_second_text_stream: bool = False
    depformer_dim: int = 256
    depformer_dim_feedforward: int | None = None
    depformer_num_heads: int | None = None
    depformer_num_layers: int | None = None
    depformer_layer_scale: float | None = None
    depformer_gating: str | None = None
    depformer_max_period: float | None = None
    depformer_pos_emb: str = "sin"
    depformer_norm: str | None = None
    depformer_multi_linear: bool = False
    depformer_weights_per_step: bool = False
    depformer_weights_per_step_schedule: list[int] | None = None
    depformer_low_rank_embeddings: int | None = None
    depformer_context: int | None = None  # ignored, as by the reference: the depformer sees one frame
    depformer_causal: bool = True  # deprecated key, ignored
    # TTS: the voice through cross-attention, settings summed into the input (see conditioners.py)
    cross_attention: bool = False
    conditioners: dict[str, Any] | None = None
    fuser: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.delays) != self.n_q + 1:
            raise ValueError(f"delays has {len(self.delays)} entries; n_q={self.n_q} needs {self.n_q + 1}")
        unsupported = {
            "norm_emb": self.norm_emb, "bias_proj": self.bias_proj, "depformer_norm": self.depformer_norm,
        }
        for key, value in unsupported.items():
            if value:
                raise ValueError(f"LM option {key}={value!r} is not supported yet")
        if not isinstance(self.depformer_dim_feedforward, (int, type(None))):
            raise ValueError("a per-step list of depformer_dim_feedforward is not supported yet")
        schedule = self.depformer_weights_per_step_schedule
        if schedule is not None and len(schedule) != self.dep_q:
            raise ValueError(f"depformer_weights_per_step_schedule needs {self.dep_q} entries")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LMConfig":
        """From a config JSON: LM keys are used, the other keys of `config.json` are left out."""
        known = {f.name for f in fields(cls)}
        if "demux_second_stream" in data:  # the released files' older name, renamed by Kyutai's loader
            data = dict(data)
            data["demux_second_text_stream"] = data.pop("demux_second_stream")
        not_lm = {"moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
                  "lm_gen_config", "tts_config", "stt_config", "model_id", "lora", "lora_rank", "lora_scaling",
                  "quantize"}
        unknown = sorted(set(data) - known - not_lm)
        if unknown:
            raise ValueError(f"unknown LM config keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def num_codebooks(self) -> int:
        return self.n_q + 1

    def temporal_config(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=int(self.hidden_scale * self.dim), layer_scale=self.layer_scale,
            context=self.context, max_period=self.max_period, gating=self.gating, norm=self.norm,
            positional_embedding=self.positional_embedding, cross_attention=self.cross_attention,
        )

    def depformer_config(self) -> TransformerConfig:
        """The depth transformer inherits the main options unless a `depformer_` key overrides them."""
        def pick(value, default):
            return default if value is None else value

        return TransformerConfig(
            d_model=self.depformer_dim,
            num_heads=pick(self.depformer_num_heads, self.num_heads),
            num_layers=pick(self.depformer_num_layers, self.num_layers),
            dim_feedforward=pick(self.depformer_dim_feedforward, int(self.hidden_scale * self.depformer_dim)),
            layer_scale=pick(self.depformer_layer_scale, self.layer_scale),
            context=None,
            max_period=pick(self.depformer_max_period, self.max_period),
            gating=pick(self.depformer_gating, self.gating),
            norm=self.norm,
            positional_embedding=self.depformer_pos_emb,
            weights_per_step=self.dep_q if self.depformer_weights_per_step else 0,
            weights_per_step_schedule=self.depformer_weights_per_step_schedule,
        )


MOSHI_7B: dict[str, Any] = {
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048,
    "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 3000, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 1024, "depformer_dim_feedforward": 4224,
    "depformer_num_heads": 16, "depformer_num_layers": 6, "depformer_layer_scale": None,
    "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


class ScaledEmbedding(nn.Embedding):
    """Embedding where token -1 gives an exact zero; optionally low rank (then projected up).

    With `demux`, a token carries two: `(second + 1) * num_embeddings + first` (TTS feeds the
    text and a look-ahead text stream in one token); each part is looked up in the same table
    and projected by its own `out1` / `out2`, and a second part of -1 adds nothing.
    """

    def __init__(self, num_embeddings: int, dim: int, low_rank: int | None = None, demux: bool = False) -> None:
        super().__init__(num_embeddings, low_rank or dim)
        self.low_rank = Linear(low_rank, dim, bias=False) if low_rank else None
        self.demux = demux
        if demux:
            self.out1 = Linear(low_rank or dim, dim, bias=False)
            self.out2 = Linear(low_rank or dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.demux:
            return self._demux_forward(tokens)
        y = super().forward(tokens.clamp(min=0))
        y = torch.where((tokens == ZERO_TOKEN)[..., None], torch.zeros((), dtype=y.dtype, device=y.device), y)
        return self.low_rank(y) if self.low_rank is not None else y

    def _demux_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        clamped = tokens.clamp(min=0)
        first = super().forward(clamped % self.num_embeddings)
        second_index = clamped // self.num_embeddings - 1
        second = self.out2(super().forward(second_index.clamp(min=0)))
        y = self.out1(first) + torch.where((second_index < 0)[..., None], torch.zeros((), dtype=second.dtype), second)
        # `low_rank` exists in the files but the two projections already map to `dim`.
        return torch.where((tokens == ZERO_TOKEN)[..., None], torch.zeros((), dtype=y.dtype), y)


class LMOutput(NamedTuple):
    logits: torch.Tensor  # [B, dep_q, T, card], NaN where invalid
    mask: torch.Tensor  # [B, dep_q, T]
    text_logits: torch.Tensor  # [B, 1, T, text_card]
    text_mask: torch.Tensor  # [B, 1, T]


def delay_streams(codes: torch.Tensor, delays: list[int], fill: torch.Tensor) -> torch.Tensor:
    """Shift stream k of codes [B, K, T] `delays[k]` steps later, filling with fill [B, K, 1]."""
    out = codes.clone()
    for k, d in enumerate(delays):
        if d:
            out[:, k, d:] = codes[:, k, :-d]
            out[:, k, :d] = fill[:, k]
    return out


def undelay_streams(values: torch.Tensor, delays: list[int], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `delay_streams` for values [B, K, T, ...]; the `delays[k]` last steps are
    invalid: filled with `fill` and False in the returned mask [B, K, T]."""
    B, K, T = values.shape[:3]
    mask = torch.ones(B, K, T, dtype=torch.bool, device=values.device)
    out = values.clone()
    for k, d in enumerate(delays):
        if d:
            out[:, k, : T - d] = values[:, k, d:]
            out[:, k, T - d :] = fill
            mask[:, k, T - d :] = False
    return out, mask


class LMModel(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, dep_dim = cfg.dim, cfg.depformer_dim
        self.emb = nn.ModuleList([ScaledEmbedding(cfg.card + 1, dim) for _ in range(cfg.n_q)])
        self.text_emb = ScaledEmbedding(cfg.text_card + 1, dim, demux=cfg.demux_second_text_stream)
        self.text_linear = Linear(dim, cfg.text_card_out or cfg.text_card, bias=False)
        self.transformer = Transformer(cfg.temporal_config())
        self.out_norm = make_norm(cfg.norm, dim)
        self.depformer: Transformer | None = None
        if cfg.dep_q > 0:
            num_in = 1
            if cfg.depformer_multi_linear:
                schedule = cfg.depformer_weights_per_step_schedule
                num_in = max(schedule) + 1 if schedule else cfg.dep_q
            self.depformer_in = nn.ModuleList([Linear(dim, dep_dim, bias=False) for _ in range(num_in)])
            low_rank = cfg.depformer_low_rank_embeddings
            self.depformer_emb = nn.ModuleList(
                [ScaledEmbedding(cfg.card + 1, dep_dim, low_rank) for _ in range(cfg.dep_q - 1)]
            )
            self.depformer_text_emb = ScaledEmbedding(cfg.text_card + 1, dep_dim, low_rank,
                                                      demux=cfg.demux_second_text_stream)
            self.depformer = Transformer(cfg.depformer_config())
        self.extra_heads = nn.ModuleList(
            [Linear(dim, cfg.extra_heads_dim, bias=False) for _ in range(cfg.extra_heads_num_heads)]
        )
        self.linears = nn.ModuleList([Linear(dep_dim, cfg.card, bias=False) for _ in range(cfg.dep_q)])
        self.condition_provider: ConditionProvider | None = None
        self.fuser: FuserConfig | None = None
        if cfg.conditioners:
            self.condition_provider = ConditionProvider(dim, cfg.conditioners)
            self.fuser = FuserConfig.from_dict(cfg.fuser or {})

    # -- tokens ---------------------------------------------------------------------------

    def initial_tokens(self, batch_size: int = 1) -> torch.Tensor:
        """The start-of-sequence column [B, K, 1]: text_card for text, card for audio."""
        cfg = self.cfg
        column = torch.tensor([cfg.text_card] + [cfg.card] * cfg.n_q, device=self.text_emb.weight.device)
        return column.view(1, -1, 1).expand(batch_size, -1, -1)

    # -- temporal transformer --------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, K, T] -> summed embeddings [B, T, dim] (audio streams first, then text)."""
        x = None
        for k, emb in enumerate(self.emb):
            e = emb(tokens[:, 1 + k])
            x = e if x is None else x + e
        text = self.text_emb(tokens[:, 0])
        return text if x is None else x + text

    def init_state(self, batch_size: int, max_step: int = 1) -> KVCache:
        """KV cache of the temporal transformer for `batch_size` streams."""
        return self.transformer.init_state(batch_size, max_step)

    def forward_text(self, tokens: torch.Tensor, cache: KVCache, condition_sum: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None,
                     active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, K, T] -> (normed hidden state z [B, T, dim], text logits [B, 1, T, text_card]).

        With `rows` [B], the tokens are those of the cache's streams `rows`; with `active` [B]
        bool, only the active streams' cache advances (see `Transformer.step`).

        `condition_sum` [B, 1, dim] (TTS settings) is added to every step's input; a voice to
        attend to is set once per session with `transformer.set_cross_source(cache, ...)`.
        """
        x = self.embed(tokens)
        if condition_sum is not None:
            x = x + condition_sum.to(x)
        z = self.out_norm(self.transformer.step(x, cache, rows, active))
        return z, self.text_linear(z)[:, None]

    # -- depth transformer -----------------------------------------------------------------

    def _depformer_input(self, slot: int, z: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Input of depth slot `slot`: projected z plus the embedding of the previous token."""
        cfg = self.cfg
        index = 0
        if cfg.depformer_multi_linear:
            schedule = cfg.depformer_weights_per_step_schedule
            index = schedule[slot] if schedule else slot
        emb = self.depformer_text_emb if slot == 0 else self.depformer_emb[slot - 1]
        return self.depformer_in[index](z) + emb(previous)

    def depformer_logits(self, slot: int, z: torch.Tensor, previous: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One streaming depth step: z [B, 1, dim], previous token [B, 1] -> logits [B, 1, card]."""
        out = self.depformer.step(self._depformer_input(slot, z, previous), cache)
        return self.linears[slot](out)

    def init_depformer_state(self, batch_size: int) -> KVCache:
        return self.depformer.init_state(batch_size, max_step=self.cfg.dep_q, capacity=self.cfg.dep_q)

    # -- teacher forcing --------------------------------------------------------------------

    def forward(self, codes: torch.Tensor) -> LMOutput:
        """Teacher-forced logits for codes [B, K, T] (-1 allowed), aligned with the codes."""
        cfg = self.cfg
        B, K, T = codes.shape
        if K != cfg.num_codebooks:
            raise ValueError(f"codes have {K} streams; the model takes {cfg.num_codebooks}")
        initial = self.initial_tokens(B)
        delayed = torch.cat([initial, delay_streams(codes, cfg.delays, initial)], dim=2)  # [B, K, T + 1]
        z, text_logits = self.forward_text(delayed[:, :, :-1], self.init_state(B, max_step=T))
        targets = delayed[:, :, 1:]
        # Depth transformer over the dep_q slots of every step at once: [B * T, dep_q, dep_dim].
        # Slot s gets the target of stream s: the text for slot 0, Moshi's codebook s-1 after.
        inputs = [self._depformer_input(slot, z, targets[:, slot]) for slot in range(cfg.dep_q)]
        out = self.depformer(torch.stack(inputs, dim=2).flatten(0, 1))
        logits = torch.stack([self.linears[s](out[:, s]).view(B, T, -1) for s in range(cfg.dep_q)], dim=1)
        logits, mask = undelay_streams(logits, cfg.delays[1 : 1 + cfg.dep_q], math.nan)
        mask &= codes[:, 1 : 1 + cfg.dep_q] != ZERO_TOKEN
        text_logits, text_mask = undelay_streams(text_logits, cfg.delays[:1], math.nan)
        text_mask &= codes[:, :1] != ZERO_TOKEN
        return LMOutput(logits, mask, text_logits, text_mask)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device
