"""Conditions of Kyutai's TTS model: a voice (speaker embeddings) and a few named settings.

A config's `conditioners` block names each conditioner and its type (official keys):

- `tensor` (`speaker_wavs`): a tensor [B, S, dim] with a mask, projected to the model width;
  masked positions take a learnt padding vector. Fused by cross-attention.
- `lut` (`cfg`, `control`): one value out of `possible_values`, looked up in a table and
  projected; a missing value (None) takes the learnt padding. Fused by summation into every
  step's input embedding.

The `fuser` block says which condition goes where, and whether the cross-attention source
gets sinusoidal positions. Weights live in the LM file under `condition_provider.*` and are
kept in float32 whatever the LM's dtype, as Kyutai's loader does.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moshi_core.nn.transformer import sin_embedding


@dataclass
class FuserConfig:
    """The config's `fuser` block (official keys); only `sum` and `cross` are supported."""

    sum: list[str] = field(default_factory=list)
    cross: list[str] = field(default_factory=list)
    prepend: list[str] = field(default_factory=list)
    cross_attention_pos_emb: bool = False
    cross_attention_pos_emb_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.prepend:
            raise ValueError("prepended conditions are not supported (Kyutai's models do not use them)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FuserConfig":
        return cls(**data)


class LUTConditioner(nn.Module):
    """A value from a fixed list -> [B, 1, output_dim]: `embed` then `output_proj`."""

    def __init__(self, output_dim: int, n_bins: int, dim: int, tokenizer: str = "noop",
                 possible_values: list[str] | None = None) -> None:
        super().__init__()
        if tokenizer != "noop":
            raise ValueError(f"LUT conditioner tokenizer {tokenizer!r} is not supported")
        if possible_values is None:
            raise ValueError("a LUT conditioner without possible_values is not supported")
        self.values = {value: i for i, value in enumerate(possible_values)}
        self.n_bins = n_bins
        self.embed = nn.Embedding(n_bins + 1, dim)  # the last row is for a missing value
        self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.learnt_padding = nn.Parameter(torch.zeros(1, 1, output_dim))

    def index(self, value: str | None) -> int:
        if value is None:
            return self.n_bins
        if value not in self.values:
            raise ValueError(f"{value!r} is not one of {', '.join(self.values)}")
        return self.values[value]

    def forward(self, values: list[str | None]) -> torch.Tensor:
        device = self.embed.weight.device
        index = torch.tensor([self.index(v) for v in values], device=device)[:, None]  # [B, 1]
        present = torch.tensor([v is not None for v in values], device=device)[:, None, None]
        return torch.where(present, self.output_proj(self.embed(index)), self.learnt_padding)


class TensorConditioner(nn.Module):
    """Given vectors [B, S, dim] and mask [B, S] -> [B, S, output_dim]."""

    def __init__(self, output_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.learnt_padding = nn.Parameter(torch.zeros(1, 1, output_dim))

    def forward(self, tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        projected = self.output_proj(tensor.to(self.output_proj.weight))
        return torch.where(mask[..., None], projected, self.learnt_padding)


def make_conditioner(output_dim: int, spec: dict[str, Any]) -> nn.Module:
    """One entry of the config's `conditioners` block: {"type": T, T: {options}}."""
    kind = spec.get("type")
    options = dict(spec.get(kind) or {})
    if kind == "lut":
        return LUTConditioner(output_dim, **options)
    if kind == "tensor":
        return TensorConditioner(output_dim, **options)
    raise ValueError(f"conditioner type {kind!r} is not supported (lut or tensor)")


class ConditionProvider(nn.Module):
    """The named conditioners (`condition_provider.conditioners.<name>.*` in the files)."""

    def __init__(self, output_dim: int, specs: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.conditioners = nn.ModuleDict({name: make_conditioner(output_dim, s) for name, s in specs.items()})

    def lut(self, name: str) -> LUTConditioner | None:
        conditioner = self.conditioners[name] if name in self.conditioners else None  # noqa: SIM401 (ModuleDict has no get)
        return conditioner if isinstance(conditioner, LUTConditioner) else None

    def embed(self, values: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{name: list of values (LUT) or (tensor, mask) (tensor)} -> {name: [B, S, output_dim]}."""
        missing = sorted(set(self.conditioners) - set(values))
        if missing:
            raise ValueError(f"no value for the condition(s) {', '.join(missing)}")
        out = {}
        for name, conditioner in self.conditioners.items():
            value = values[name]
            out[name] = conditioner(*value) if isinstance(conditioner, TensorConditioner) else conditioner(value)
        return out


def fuse(cfg: FuserConfig, conditions: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sum [B, 1, dim] added to every input step, cross-attention source [B, S, dim])."""
    total = None
    for name in cfg.sum:
        total = conditions[name] if total is None else total + conditions[name]
    cross = None
    if cfg.cross:
        cross = torch.cat([conditions[name] for name in cfg.cross], dim=1)
        if cfg.cross_attention_pos_emb:
            positions = torch.arange(cross.shape[1], device=cross.device)[None]
            pos = sin_embedding(positions, cross.shape[-1], 10000).to(cross.dtype)
            cross = cross + cfg.cross_attention_pos_emb_scale * pos
    return total, cross
