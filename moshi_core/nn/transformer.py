"""Causal streaming transformer: Mimi's two, Moshi's temporal one and its depth transformer.

One code path: `step(x, cache)` appends T steps to a per-layer ring KV cache, and offline
`forward(x)` is `step` on a fresh cache sized for the whole input. The ring holds
`context + max_step - 1` entries, so every query of a multi-step call still sees its whole
attention window and streaming equals offline at any length.

Options follow Kyutai's config keys: norms (`layer_norm`, `layer_norm_f32`, `rms_norm`,
`rms_norm_f32`), plain GELU MLP or gated (`gating="silu"`), positions (`rope` interleaved,
`sin`, `none`), optional layer scale, and separate weights for each step of a short
sequence (`weights_per_step`, optionally shared through `weights_per_step_schedule`), which
the depth transformer uses across codebooks.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moshi_core.kernels.build import kernel_for
from moshi_core.kernels.linear import Linear, linear
from moshi_core.nn.derived import DerivedWeights
from moshi_core.nn.streaming import keep_mask

NORMS = ("layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32")
POSITIONS = ("rope", "sin", "none")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@dataclass
class TransformerConfig:
    """Official keys of Kyutai's transformer configs (Mimi's `transformer`, the LM's)."""

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    causal: bool = True
    layer_scale: float | None = 0.01
    context: int | None = 250
    max_period: float = 10000
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "rope"
    positional_scale: float = 1.0
    weights_per_step: int = 0
    weights_per_step_schedule: list[int] | None = None
    cross_attention: bool = False  # TTS: every layer also attends to a condition (the voice)
    conv_layout: bool = True  # Kyutai's tensor layout; ours is always [B, T, C]
    input_dimension: int | None = None
    output_dimensions: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.output_dimensions = tuple(self.output_dimensions)  # JSON gives a list
        if not self.causal:
            raise ValueError("transformer.causal=False is not supported")
        if self.norm not in NORMS:
            raise ValueError(f"transformer.norm={self.norm!r} is not supported (one of {NORMS})")
        if self.positional_embedding not in POSITIONS:
            raise ValueError(f"transformer.positional_embedding={self.positional_embedding!r} is not supported")
        if self.gating != "none" and self.gating not in ACTIVATIONS:
            raise ValueError(f"transformer.gating={self.gating!r} is not supported")
        if any(d != self.d_model for d in self.output_dimensions) or self.input_dimension not in (None, self.d_model):
            raise ValueError("input/output projections of the transformer are not supported")
        schedule = self.weights_per_step_schedule
        if schedule is not None and len(schedule) != self.weights_per_step:
            raise ValueError("weights_per_step_schedule needs one entry per step")

    @property
    def weight_sets(self) -> int:
        """How many copies of the per-step weights exist (1 when shared across steps)."""
        if not self.weights_per_step:
            return 1
        schedule = self.weights_per_step_schedule
        return max(schedule) + 1 if schedule else self.weights_per_step

    def weight_index(self, step: int) -> int:
        schedule = self.weights_per_step_schedule
        return schedule[step] if schedule else step


# -- positions -----------------------------------------------------------------------------


def rope_rotation(positions: torch.Tensor, head_dim: int, max_period: float) -> torch.Tensor:
    """Unit complex rotations [B, 1, T, head_dim / 2] for RoPE, computed in float32."""
    half = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(half * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.float()[:, None, :, None]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (real, imag) pairs of x [..., T, D] by complex `rotation`."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """[cos | sin] of position / max_period^(i / (dim/2 - 1)), [B, T, dim] in float32."""
    half = torch.arange(dim // 2, device=positions.device, dtype=torch.float32)
    phase = positions.float()[..., None] / (torch.tensor(max_period, device=positions.device) ** (half / (dim // 2 - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def window_mask(pos_q: torch.Tensor, pos_k: torch.Tensor, context: int | None) -> torch.Tensor:
    """[B, 1, Tq, Tk] True where query may attend key: causal, within `context`, key present."""
    delta = pos_q[:, :, None] - pos_k[:, None, :]
    allowed = (delta >= 0) & (pos_k >= 0)[:, None, :]
    if context is not None:
        allowed &= delta < context
    return allowed[:, None]


# -- cache ---------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Per-layer ring buffers with shared position bookkeeping."""

    keys: list[torch.Tensor]  # per layer [B, H, C, D]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [B, C] absolute position held in each slot, -1 if empty
    offset: torch.Tensor  # [B] next absolute position
    max_step: int
    # Whether `steps` is kept: only per-step weights and context-free caches (the depth
    # transformer) read it. Elsewhere it stays 0, so a compiled step reads no Python int
    # that changes every call (dynamo would guard on it and recompile each step).
    count_steps: bool = True
    steps: int = 0  # steps taken since the last full reset: selects per-step weights
    # Cross-attention keys and values per layer [B, H, S, D], computed once per session.
    cross_keys: list[torch.Tensor] | None = None
    cross_values: list[torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step updates in place."""
        return [*self.keys, *self.values, self.positions, self.offset]

    def reset(self, mask: torch.Tensor | None = None) -> None:
        # Stale keys are masked out by `positions`; the buffers need no clearing.
        if mask is None:
            self.positions.fill_(-1)
            self.offset.zero_()
            self.steps = 0
        else:
            self.positions.copy_(torch.where(mask[:, None], -1, self.positions))
            self.offset.mul_(keep_mask(mask, 1))

    def first(self, n: int) -> "KVCache":
        """The first `n` streams, sharing this cache's storage (scratch for a smaller batch)."""
        if n == self.offset.shape[0]:
            return self
        return KVCache([k[:n] for k in self.keys], [v[:n] for v in self.values], self.positions[:n],
                       self.offset[:n], self.max_step, self.count_steps, self.steps)

    def advance(self, steps: int, rows: torch.Tensor | None = None,
                active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Claim `steps` entries for every stream, or for the streams `rows` [A] only; returns
        the write indices [A, T], the query positions [A, T] and the positions [A, C] to mask with.

        With `active` [B] bool (rows None), every stream gets indices and positions but only
        the active ones keep them: an inactive stream's offset and positions stay as they were.
        Its keys and values are still written, at its next write index, and its next real
        step writes that same entry before any query reads it, so the stray write is never seen.
        The mask is built as if every stream advanced: a fresh stream's query then sees its own
        key, never an empty window (whose softmax would be NaN).
        """
        if steps > self.max_step:
            raise ValueError(f"a step of {steps} exceeds the cache's max_step={self.max_step}")
        if active is not None and rows is not None:
            raise ValueError("step either `rows` or an `active` mask, not both")
        offset = self.offset if rows is None else self.offset[rows]
        pos_q = offset[:, None] + torch.arange(steps, device=self.offset.device)
        index = pos_q % self.capacity
        if active is not None:
            advanced = self.positions.scatter(1, index, pos_q)
            self.positions.copy_(torch.where(active[:, None], advanced, self.positions))
            self.offset.add_(active.long() * steps)
            positions = advanced
        elif rows is None:
            self.positions.scatter_(1, index, pos_q)
            self.offset.add_(steps)
            positions = self.positions
        else:
            self.positions[rows[:, None], index] = pos_q
            self.offset[rows] = offset + steps
            positions = self.positions[rows]
        if self.count_steps:
            self.steps += steps
        return index, pos_q, positions


@dataclass
class _StepContext:
    """What every layer of one call shares."""

    rotation: torch.Tensor | None  # complex [A, 1, T, D / 2]
    rows: torch.Tensor | None  # [A] cache row of each input row; None: all, in order
    index: torch.Tensor  # [A, T] cache entry of each new step
    mask: torch.Tensor  # [A, 1, T, C]
    first_step: int
    slots: torch.Tensor = field(init=False)  # [A, 1] cache rows, to pair with `index`
    rotation_pairs: torch.Tensor = field(init=False)  # the rotation as (cos, sin) pairs, for the fused kernel

    def __post_init__(self) -> None:
        rows = self.rows if self.rows is not None else torch.arange(self.index.shape[0], device=self.index.device)
        self.slots = rows[:, None]
        self.rotation_pairs = _rotation_pairs(self.rotation)


# -- layers --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x * alpha / sqrt(eps + mean(x^2)), optionally computed in float32."""

    def __init__(self, dim: int, eps: float, in_float32: bool) -> None:
        super().__init__()
        self.eps, self.in_float32 = eps, in_float32
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _fused_rows_kernel(x) if self.in_float32 else None
        if kernel is not None:
            return kernel.rms_norm(x, self.alpha, self.eps)
        y = x.float() if self.in_float32 else x
        var = self.eps + y.pow(2).mean(dim=-1, keepdim=True)
        return (y * (self.alpha.to(var) * torch.rsqrt(var))).to(x.dtype)


# A streaming step's rows are few: one fused CPU call beats PyTorch's several operations.
FUSED_MAX_ROWS = 16


def _fused_rows_kernel(x: torch.Tensor, float32_only: bool = False):
    """Our fused row kernels (`csrc/norm.cpp`) for a streaming step's few rows on CPU, else None."""
    if x.numel() > FUSED_MAX_ROWS * x.shape[-1] or torch.is_grad_enabled():
        return None
    if float32_only and x.dtype != torch.float32:
        return None
    return kernel_for(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU (Mimi's MLPs)."""
    kernel = _fused_rows_kernel(x, float32_only=True)
    return kernel.gelu(x) if kernel is not None else F.gelu(x)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        affine = self.weight is not None and self.bias is not None
        kernel = _fused_rows_kernel(x, float32_only=True) if affine else None
        if kernel is not None and self.weight.dtype == torch.float32:
            return kernel.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class LayerNormF32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


LAYER_NORM_EPS = 1e-5


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer_norm":
        return LayerNorm(dim, eps=LAYER_NORM_EPS)
    if kind == "layer_norm_f32":
        return LayerNormF32(dim, eps=1e-8)
    return RMSNorm(dim, eps=1e-8 if kind == "rms_norm_f32" else 1e-5, in_float32=kind == "rms_norm_f32")


def _per_step(x: torch.Tensor, first_step: int, cfg: TransformerConfig, apply) -> torch.Tensor:
    """apply(x_t [B, 1, C], weight set) for each step, or once when weights are shared."""
    if cfg.weight_sets == 1:
        return apply(x, 0)
    if first_step + x.shape[1] > cfg.weights_per_step:
        raise ValueError(f"step {first_step + x.shape[1]} is past the {cfg.weights_per_step} per-step weights")
    if x.shape[1] == 1:
        return apply(x, cfg.weight_index(first_step))
    return torch.cat([apply(x[:, t : t + 1], cfg.weight_index(first_step + t)) for t in range(x.shape[1])], dim=1)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d, sets = cfg.d_model, cfg.weight_sets
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        # Fused [q | k | v] projections (one block of rows per weight set), named as in the checkpoints.
        self.in_proj_weight = nn.Parameter(torch.empty(sets * 3 * d, d))
        self.out_proj = Linear(d, sets * d, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _project(self, x: torch.Tensor, weight: torch.Tensor, first_step: int) -> torch.Tensor:
        sets = self.cfg.weight_sets
        rows = weight.shape[0] // sets

        def apply(x_t: torch.Tensor, i: int) -> torch.Tensor:
            B, T, _ = x_t.shape
            w = weight if sets == 1 else weight[i * rows : (i + 1) * rows]  # a slice costs a few µs
            return linear(x_t.reshape(B * T, -1), w).view(B, T, -1)

        return _per_step(x, first_step, self.cfg, apply)

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: _StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self._project(x, self.in_proj_weight, ctx.first_step)
        kernel = _fused_step_kernel(qkv, keys) if T <= FUSED_MAX_STEPS else None
        if kernel is not None:
            y = kernel.attention_step(qkv, ctx.rotation_pairs, keys, values, ctx.slots[:, 0], ctx.index, ctx.mask[:, 0])
            return self._project(y, self.out_proj.weight, ctx.first_step)
        q, k, v = qkv.view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        if ctx.rotation is not None:
            q, k = apply_rope(torch.stack([q, k]), ctx.rotation)
        # Indexed writes: `scatter_` copies the whole cache for bfloat16 on CPU (15 ms a layer).
        keys[ctx.slots, :, ctx.index] = k.transpose(1, 2)
        values[ctx.slots, :, ctx.index] = v.transpose(1, 2)
        if ctx.rows is not None:
            keys, values = keys[ctx.rows], values[ctx.rows]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask)
        return self._project(y.transpose(1, 2).reshape(B, T, -1), self.out_proj.weight, ctx.first_step)


# Streaming calls (one step of the LM, Mimi's two per frame) take the fused CPU kernel; whole
# files (offline chunks of many steps) take SDPA, whose matrix products pay there.
FUSED_MAX_STEPS = 4


def _fused_step_kernel(qkv: torch.Tensor, keys: torch.Tensor):
    """Our fused CPU attention step (`csrc/attention.cpp`) where it applies, else None."""
    if qkv.dtype not in (torch.float32, torch.bfloat16) or keys.dtype != qkv.dtype or keys.shape[-1] % 8:
        return None
    return kernel_for(qkv)


def _rotation_pairs(rotation: torch.Tensor | None) -> torch.Tensor:
    """RoPE rotations [A, 1, T, D / 2] as (cos, sin) float32 pairs [A, T, D / 2, 2]; empty without RoPE."""
    if rotation is None:
        return torch.empty(0)
    return torch.view_as_real(rotation[:, 0])


class CrossAttention(nn.Module):
    """Attention from the stream to a fixed source (the voice), no mask and no positions.

    Its keys and values depend on the source only, so `keys_values` runs once per session;
    each step then projects its query alone.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))  # [q | k | v] rows, as in the files
        self.out_proj = Linear(d, d, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source [B, S, d] -> keys and values, each [B, H, S, D]."""
        d = self.in_proj_weight.shape[1]
        B, S, _ = source.shape
        kv = linear(source, self.in_proj_weight[d:]).view(B, S, 2, self.num_heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q = linear(x, self.in_proj_weight[:d]).view(B, T, self.num_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, keys, values)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class ActivationGating(nn.Module):
    """linear_out(act(gate) * up), with [gate | up] = linear_in(x)."""

    def __init__(self, dim: int, dim_feedforward: int, activation: str) -> None:
        super().__init__()
        # Kyutai's sizing: 2/3 of dim_feedforward, or 21/8 of dim when that is 4 * dim.
        hidden = (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3
        self.linear_in = Linear(dim, 2 * hidden, bias=False)
        self.linear_out = Linear(hidden, dim, bias=False)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.linear_in(x)
        kernel = _fused_rows_kernel(gate_up) if self.activation is F.silu else None
        if kernel is not None:
            return self.linear_out(kernel.silu_mul(gate_up))
        gate, up = gate_up.unflatten(-1, (2, -1)).unbind(-2)
        return self.linear_out(self.activation(gate) * up)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def add_update(x: torch.Tensor, update: torch.Tensor, layer_scale: nn.Module) -> torch.Tensor:
    """The residual x + layer_scale(update), in update's dtype."""
    kernel = _fused_rows_kernel(update, float32_only=True) if isinstance(layer_scale, LayerScale) else None
    if kernel is not None and x.dtype == torch.float32 and layer_scale.scale.dtype == torch.float32:
        return kernel.add_scaled(x, update, layer_scale.scale)
    update = layer_scale(update)
    return x.to(update.dtype) + update


class TransformerLayer(nn.Module):
    """Pre-norm block: x + ls1 * attn(norm1 x), then x + ls2 * mlp(norm2 x)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.self_attn = Attention(cfg)
        self.norm1 = make_norm(cfg.norm, d)
        self.norm2 = make_norm(cfg.norm, d)
        if cfg.gating == "none":
            self.linear1 = Linear(d, cfg.dim_feedforward, bias=False)
            self.linear2 = Linear(cfg.dim_feedforward, d, bias=False)
        elif cfg.weight_sets > 1:
            self.gating = nn.ModuleList(
                [ActivationGating(d, cfg.dim_feedforward, cfg.gating) for _ in range(cfg.weight_sets)]
            )
        else:
            self.gating = ActivationGating(d, cfg.dim_feedforward, cfg.gating)
        has_scale = cfg.layer_scale is not None
        self.layer_scale_1 = LayerScale(d) if has_scale else nn.Identity()
        self.layer_scale_2 = LayerScale(d) if has_scale else nn.Identity()
        self.cross_attention: CrossAttention | None = None
        if cfg.cross_attention:
            self.cross_attention = CrossAttention(cfg)
            self.norm_cross = LayerNorm(d, eps=LAYER_NORM_EPS)  # always a LayerNorm, as in Kyutai's models
            self.layer_scale_cross = LayerScale(d) if has_scale else nn.Identity()

    def _mlp(self, h: torch.Tensor, first_step: int) -> torch.Tensor:
        if self.cfg.gating == "none":
            return self.linear2(gelu(self.linear1(h)))
        if isinstance(self.gating, nn.ModuleList):
            return _per_step(h, first_step, self.cfg, lambda h_t, i: self.gating[i](h_t))
        return self.gating(h)

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: _StepContext,
             cross: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = add_update(x, self.self_attn.step(self.norm1(x), keys, values, ctx), self.layer_scale_1)
        if self.cross_attention is not None:
            if cross is None:
                raise ValueError("this transformer attends to a condition: call set_cross_source first")
            x = add_update(x, self.cross_attention(self.norm_cross(x), *cross), self.layer_scale_cross)
        return add_update(x, self._mlp(self.norm2(x), ctx.first_step), self.layer_scale_2)


class Transformer(DerivedWeights):
    """Stack of layers on [B, T, C] (named `transformer` inside the checkpoints' wrapper)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.d_model // cfg.num_heads
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Offline: the whole sequence from position 0."""
        return self.step(x, self.init_state(x.shape[0], max_step=x.shape[1]))

    def init_state(self, batch_size: int, max_step: int = 1, capacity: int | None = None) -> KVCache:
        """A cache for `batch_size` streams fed at most `max_step` steps per call.

        Without an attention context (the depth transformer), `capacity` bounds the sequence.
        """
        cfg = self.cfg
        if cfg.context is not None:
            capacity = cfg.context + max_step - 1
        elif capacity is None:
            capacity = cfg.weights_per_step or max_step
        w = self.layers[0].self_attn.in_proj_weight
        shape = (batch_size, cfg.num_heads, capacity, self.head_dim)
        return KVCache(
            keys=[w.new_zeros(shape) for _ in self.layers],
            values=[w.new_zeros(shape) for _ in self.layers],
            positions=torch.full((batch_size, capacity), -1, dtype=torch.long, device=w.device),
            offset=torch.zeros(batch_size, dtype=torch.long, device=w.device),
            max_step=max_step,
            count_steps=cfg.context is None or cfg.weight_sets > 1,
        )

    def step(self, x: torch.Tensor, cache: KVCache, rows: torch.Tensor | None = None,
             active: torch.Tensor | None = None) -> torch.Tensor:
        """x [A, T, C]: the next T steps of the streams `rows` [A] of the cache (all streams, in
        order, when None). Rows that are not stepped keep their state untouched.

        With `active` [B] bool instead of `rows`, every stream computes (static shapes: one
        captured graph serves any set of streams) and only the active ones advance."""
        first_step = cache.steps
        index, pos_q, positions = cache.advance(x.shape[1], rows, active)
        cfg = self.cfg
        # A Python counter, not `offset.max()`: no device sync on the hot path.
        if cfg.context is None and cache.steps > cache.capacity:
            raise ValueError(f"sequence longer than the cache capacity {cache.capacity}")
        rotation = None
        if cfg.positional_embedding == "rope":
            rotation = rope_rotation(pos_q, self.head_dim, cfg.max_period)
        elif cfg.positional_embedding == "sin":
            x = x + cfg.positional_scale * sin_embedding(pos_q, cfg.d_model, cfg.max_period).to(x.dtype)
        ctx = _StepContext(rotation, rows, index, window_mask(pos_q, positions, cfg.context), first_step)
        kernel = self._layers_kernel(x, cache)
        if kernel is not None:
            return kernel.layers_step(x, self._layer_weights(), cache.keys, cache.values, ctx.rotation_pairs,
                                      ctx.slots[:, 0], ctx.index, ctx.mask[:, 0], LAYER_NORM_EPS)
        if cache.cross_keys is None:
            for layer, keys, values in zip(self.layers, cache.keys, cache.values):
                x = layer.step(x, keys, values, ctx)
            return x
        for i, layer in enumerate(self.layers):
            cross = (cache.cross_keys[i], cache.cross_values[i])
            if rows is not None:
                cross = (cross[0][rows], cross[1][rows])
            x = layer.step(x, cache.keys[i], cache.values[i], ctx, cross)
        return x

    def _layers_kernel(self, x: torch.Tensor, cache: KVCache):
        """Our whole-stack step (`csrc/layers.cpp`) where every layer would take our fused kernels
        one by one (Mimi's layers, float32, a streaming step on CPU), else None."""
        cfg = self.cfg
        if not (cfg.norm == "layer_norm" and cfg.gating == "none" and cfg.layer_scale is not None
                and cfg.weight_sets == 1 and cache.cross_keys is None and x.shape[1] <= FUSED_MAX_STEPS
                and self.head_dim % 8 == 0 and cfg.dim_feedforward % 8 == 0 and cfg.d_model % 8 == 0):
            return None
        kernel = _fused_rows_kernel(x, float32_only=True)
        if kernel is None or cache.keys[0].dtype != torch.float32:
            return None
        float32 = self._cached("float32_layers", lambda: all(
            isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.is_contiguous()
            for w in self._layer_weights()))  # not bfloat16 nor 8-bit (a `QuantizedWeight`)
        return kernel if float32 else None

    def _layer_weights(self) -> list[torch.Tensor]:
        """Every layer's tensors in the order `layers_step` takes them (a list made once: the
        Python attribute lookups cost a tenth of a millisecond)."""
        return self._cached("layer_weights", lambda: [w for layer in self.layers for w in (
            layer.norm1.weight, layer.norm1.bias, layer.self_attn.in_proj_weight, layer.self_attn.out_proj.weight,
            layer.layer_scale_1.scale, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight,
            layer.linear2.weight, layer.layer_scale_2.scale)])

    def set_cross_source(self, cache: KVCache, source: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Compute the cross-attention keys and values of `source` [B, S, d] into `cache`, for
        every slot, or only for the slots where `mask` [B] is True (a new request there)."""
        if not self.cfg.cross_attention:
            raise ValueError("this transformer has no cross-attention")
        kvs = [layer.cross_attention.keys_values(source) for layer in self.layers]
        if cache.cross_keys is None or mask is None:
            cache.cross_keys = [k for k, _ in kvs]
            cache.cross_values = [v for _, v in kvs]
            return
        for old_k, old_v, (k, v) in zip(cache.cross_keys, cache.cross_values, kvs):
            old_k[mask] = k[mask]
            old_v[mask] = v[mask]


class ProjectedTransformer(nn.Module):
    """Mimi's wrapper (its input/output projections are identities here): keys `transformer.*`.

    Works on [B, T, C]; the `conv_layout` of Kyutai's config is about their layout, not ours.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.transformer = Transformer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(x)

    def init_state(self, batch_size: int, max_step: int = 1) -> KVCache:
        return self.transformer.init_state(batch_size, max_step)

    def step(self, x: torch.Tensor, cache: KVCache, rows: torch.Tensor | None = None,
             active: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer.step(x, cache, rows, active)
