"""Causal transformer with interleaved RoPE, a sliding attention window and a ring KV cache.

Offline, `forward(x)` attends over the whole sequence (in blocks, so memory stays bounded
on long inputs). Streaming, `step(x, state)` appends T steps to a per-layer ring cache.
The ring holds `context + max_step - 1` entries, so every query of a multi-step call still
sees its full window and streaming equals offline at any length.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import keep_mask


@dataclass
class TransformerConfig:
    """Official keys of Kyutai's `transformer` config (the subset these models use)."""

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    causal: bool = True
    layer_scale: float | None = 0.01
    context: int | None = 250
    conv_layout: bool = True
    max_period: float = 10000
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "rope"
    dim_feedforward: int = 2048
    input_dimension: int = 512
    output_dimensions: tuple[int, ...] = (512,)

    def __post_init__(self) -> None:
        self.output_dimensions = tuple(self.output_dimensions)  # JSON gives a list
        checks = {
            "causal": (self.causal, True),
            "gating": (self.gating, "none"),
            "norm": (self.norm, "layer_norm"),
            "positional_embedding": (self.positional_embedding, "rope"),
        }
        for key, (value, expected) in checks.items():
            if value != expected:
                raise ValueError(f"transformer.{key}={value!r} is not supported (only {expected!r})")
        if tuple(self.output_dimensions) != (self.d_model,) or self.input_dimension != self.d_model:
            raise ValueError("input/output projections of the transformer are not supported")


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


def window_mask(pos_q: torch.Tensor, pos_k: torch.Tensor, context: int | None) -> torch.Tensor:
    """[B, 1, Tq, Tk] True where query may attend key: causal, within `context`, key present."""
    delta = pos_q[:, :, None] - pos_k[:, None, :]
    allowed = (delta >= 0) & (pos_k >= 0)[:, None, :]
    if context is not None:
        allowed &= delta < context
    return allowed[:, None]


@dataclass
class KVCache:
    """Ring buffers shared by position bookkeeping across layers."""

    keys: list[torch.Tensor]  # per layer [B, H, C, D]
    values: list[torch.Tensor]
    positions: torch.Tensor  # [B, C] absolute position held in each slot, -1 if empty
    offset: torch.Tensor  # [B] next absolute position
    max_step: int

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def reset(self, mask: torch.Tensor | None = None) -> None:
        keep = keep_mask(mask, 2)
        if mask is None:
            self.positions.fill_(-1)
            self.offset.zero_()
        else:
            self.positions.copy_(torch.where(mask[:, None], -1, self.positions))
            self.offset.mul_(keep.view(-1))
        # Stale keys are masked out by `positions`; the buffers need no clearing.

    def advance(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim `steps` slots; returns the write indices [B, T] and query positions [B, T]."""
        if steps > self.max_step:
            raise ValueError(f"a step of {steps} exceeds the cache's max_step={self.max_step}")
        pos_q = self.offset[:, None] + torch.arange(steps, device=self.offset.device)
        index = pos_q % self.capacity
        self.positions.scatter_(1, index, pos_q)
        self.offset.add_(steps)
        return index, pos_q


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, context: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.context = context
        # Fused [q | k | v] projection, named as in the checkpoints.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: torch.Tensor, rotation: torch.Tensor):
        B, T, _ = x.shape
        qkv = F.linear(x.reshape(B * T, -1), self.in_proj_weight)
        qkv = qkv.view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, T, D]
        q, k = apply_rope(qkv[:2], rotation)
        return q, k, qkv[2]

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B * T, -1)).view(B, T, -1)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, block: int) -> torch.Tensor:
        q, k, v = self._qkv(x, rotation)
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)[None]
        outputs = []
        for start in range(0, T, block):
            end = min(start + block, T)
            first_key = 0 if self.context is None else max(0, start - self.context + 1)
            mask = window_mask(pos[:, start:end], pos[:, first_key:end], self.context)
            outputs.append(F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, first_key:end], v[:, :, first_key:end], attn_mask=mask
            ))
        return self._out(torch.cat(outputs, dim=2))

    def step(self, x, rotation, keys, values, index, mask) -> torch.Tensor:
        q, k, v = self._qkv(x, rotation)
        write = index[:, None, :, None].expand_as(k)
        keys.scatter_(2, write, k)
        values.scatter_(2, write, v)
        return self._out(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class TransformerLayer(nn.Module):
    """Pre-norm block: x + ls1 * attn(norm1 x); x + ls2 * linear2(gelu(linear1(norm2 x)))."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.num_heads, cfg.context)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d, bias=False)
        has_scale = cfg.layer_scale is not None
        self.layer_scale_1 = LayerScale(d) if has_scale else nn.Identity()
        self.layer_scale_2 = LayerScale(d) if has_scale else nn.Identity()

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(x)
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(h.flatten(0, 1)))).view_as(h))

    def forward(self, x, rotation, block: int) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), rotation, block))
        return self._feed_forward(x)

    def step(self, x, rotation, keys, values, index, mask) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn.step(self.norm1(x), rotation, keys, values, index, mask))
        return self._feed_forward(x)


class Transformer(nn.Module):
    """Stack of layers on [B, T, C] (named `transformer` inside the checkpoints' wrapper)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.d_model // cfg.num_heads
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)[None]
        rotation = rope_rotation(pos, self.head_dim, self.cfg.max_period)
        block = max(self.cfg.context or x.shape[1], 1)
        for layer in self.layers:
            x = layer(x, rotation, block)
        return x

    def init_state(self, batch_size: int, max_step: int = 1) -> KVCache:
        if self.cfg.context is None:
            raise ValueError("streaming needs a finite attention context")
        w = self.layers[0].self_attn.in_proj_weight
        capacity = self.cfg.context + max_step - 1
        shape = (batch_size, self.cfg.num_heads, capacity, self.head_dim)
        return KVCache(
            keys=[w.new_zeros(shape) for _ in self.layers],
            values=[w.new_zeros(shape) for _ in self.layers],
            positions=torch.full((batch_size, capacity), -1, dtype=torch.long, device=w.device),
            offset=torch.zeros(batch_size, dtype=torch.long, device=w.device),
            max_step=max_step,
        )

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        index, pos_q = cache.advance(x.shape[1])
        rotation = rope_rotation(pos_q, self.head_dim, self.cfg.max_period)
        mask = window_mask(pos_q, cache.positions, self.cfg.context)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            x = layer.step(x, rotation, keys, values, index, mask)
        return x


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

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.transformer.step(x, cache)
