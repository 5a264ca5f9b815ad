"""Causal 1-D convolutions that give the same output offline and streaming.

A causal conv pads `kernel_eff - stride` samples on the left (zeros, or copies of the first
sample in `replicate` mode) and none on the right. Streaming keeps those last input samples
between calls. A causal transposed conv drops its last `kernel - stride` output samples;
streaming keeps them (without bias) and adds them to the start of the next call's output.

Module nesting (`conv.conv`, `convtr.convtr`) mirrors Kyutai's checkpoints so their keys
load unchanged.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import keep_mask


@dataclass
class ConvState:
    previous: torch.Tensor  # [B, C_in, P]: last P input samples
    first: torch.Tensor | None  # [B] bool: replicate padding not taken yet (replicate mode only)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        self.previous.mul_(keep_mask(mask, 3))
        if self.first is not None:
            self.first.copy_(torch.ones_like(self.first) if mask is None else self.first | mask)


@dataclass
class ConvTransposeState:
    partial: torch.Tensor  # [B, C_out, K - S]: overlap of the last call, bias excluded

    def reset(self, mask: torch.Tensor | None = None) -> None:
        self.partial.mul_(keep_mask(mask, 3))


class NormConv1d(nn.Module):
    """Holds the `nn.Conv1d` one level down, as in the checkpoints (weight norm is pre-folded)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv1d(*args, **kwargs)


class NormConvTranspose1d(nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.convtr = nn.ConvTranspose1d(*args, **kwargs)


class StreamingConv1d(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', not {pad_mode!r}")
        self.conv = NormConv1d(
            in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias
        )
        self.stride = stride
        self.padding = (kernel_size - 1) * dilation + 1 - stride
        self.pad_mode = pad_mode

    @property
    def layer(self) -> nn.Conv1d:
        return self.conv.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.stride:
            raise ValueError(f"input length {x.shape[-1]} is not a multiple of the stride {self.stride}")
        mode = "replicate" if self.pad_mode == "replicate" else "constant"
        return self.layer(F.pad(x, (self.padding, 0), mode=mode))

    def init_state(self, batch_size: int, device=None, dtype=None) -> ConvState:
        w = self.layer.weight
        previous = torch.zeros(
            batch_size, w.shape[1] * self.layer.groups, self.padding,
            device=device or w.device, dtype=dtype or w.dtype,
        )
        first = None
        if self.pad_mode == "replicate":
            first = torch.ones(batch_size, dtype=torch.bool, device=previous.device)
        return ConvState(previous, first)

    def step(self, x: torch.Tensor, state: ConvState) -> torch.Tensor:
        if x.shape[-1] % self.stride:
            raise ValueError(f"input length {x.shape[-1]} is not a multiple of the stride {self.stride}")
        previous = state.previous
        if state.first is not None:
            previous = torch.where(state.first.view(-1, 1, 1), x[..., :1], previous)
            state.first.zero_()
        x = torch.cat([previous, x], dim=-1)
        if self.padding:
            state.previous.copy_(x[..., x.shape[-1] - self.padding:])
        return self.layer(x)


class StreamingConvTranspose1d(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.convtr = NormConvTranspose1d(
            in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias
        )
        self.overlap = kernel_size - stride

    @property
    def layer(self) -> nn.ConvTranspose1d:
        return self.convtr.convtr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y[..., : y.shape[-1] - self.overlap]

    def init_state(self, batch_size: int, device=None, dtype=None) -> ConvTransposeState:
        w = self.layer.weight
        partial = torch.zeros(
            batch_size, self.layer.out_channels, self.overlap,
            device=device or w.device, dtype=dtype or w.dtype,
        )
        return ConvTransposeState(partial)

    def step(self, x: torch.Tensor, state: ConvTransposeState) -> torch.Tensor:
        y = self.layer(x)
        if not self.overlap:
            return y
        end = y.shape[-1] - self.overlap
        y[..., : self.overlap] += state.partial
        tail = y[..., end:]
        if self.layer.bias is not None:
            # The bias is added again by the next call's conv; keep it out of the carry.
            tail = tail - self.layer.bias[:, None]
        state.partial.copy_(tail)
        return y[..., :end]
