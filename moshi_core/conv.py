"""Causal 1-D convolutions that give the same output offline and streaming.

A causal conv pads `kernel_eff - stride` samples on the left (zeros, or copies of the first
sample in `replicate` mode) and none on the right; streaming keeps those last input samples
between calls. A causal transposed conv keeps the first `stride * frames` output samples.

The transposed conv is computed as an ordinary causal conv with `kernel / stride` taps and
`stride` times the output channels, whose channels are then interleaved in time (sub-pixel
convolution). That is the same sum in another order, but its streaming state is input
history like the plain conv's, and small streaming calls become one matrix product instead
of PyTorch's slow transposed-conv path.

Module nesting (`conv.conv`, `convtr.convtr`) mirrors Kyutai's checkpoints so their keys
load unchanged.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import keep_mask

# Below this many output steps a conv is faster as unfold + one GEMM than through oneDNN.
GEMM_MAX_STEPS = 64


@dataclass
class ConvState:
    previous: torch.Tensor  # [B, C_in, P]: last P input samples
    first: torch.Tensor | None  # [B] bool: replicate padding not taken yet (replicate mode only)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        self.previous.mul_(keep_mask(mask, 3))
        if self.first is not None:
            self.first.copy_(torch.ones_like(self.first) if mask is None else self.first | mask)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, groups: int) -> torch.Tensor:
    """Valid (unpadded) conv of x [B, C_in, L]; the caller has prepended the causal context."""
    kernel = weight.shape[-1]
    steps = (x.shape[-1] - kernel) // stride + 1
    if groups > 1 or steps > GEMM_MAX_STEPS:
        return F.conv1d(x, weight, bias, stride, groups=groups)
    B, C = x.shape[:2]
    cols = x.unfold(2, kernel, stride).transpose(1, 2).reshape(B * steps, C * kernel)
    out = F.linear(cols, weight.view(weight.shape[0], -1), bias)  # [B * steps, C_out]
    return out.view(B, steps, -1).transpose(1, 2)


class NormConv1d(nn.Module):
    """Holds the `nn.Conv1d` one level down, as in the checkpoints (weight norm is pre-folded)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv1d(*args, **kwargs)


class NormConvTranspose1d(nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.convtr = nn.ConvTranspose1d(*args, **kwargs)


class _CausalBase(nn.Module):
    """Shared streaming logic: keep `padding` input samples of history per stream."""

    padding: int
    pad_mode: str = "constant"

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """(weight, bias, stride, groups) of the equivalent causal conv."""
        raise NotImplementedError

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _check(self, x: torch.Tensor) -> None:
        stride = self._weights()[2]
        if x.shape[-1] % stride:
            raise ValueError(f"input length {x.shape[-1]} is not a multiple of the stride {stride}")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, stride, groups = self._weights()
        return self._finish(causal_conv(x, weight, bias, stride, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self._run(F.pad(x, (self.padding, 0), mode=self.pad_mode))

    def init_state(self, batch_size: int) -> ConvState:
        weight = self._weights()[0]
        channels = weight.shape[1] * self._weights()[3]
        previous = weight.new_zeros(batch_size, channels, self.padding)
        first = None
        if self.pad_mode == "replicate":
            first = torch.ones(batch_size, dtype=torch.bool, device=weight.device)
        return ConvState(previous, first)

    def step(self, x: torch.Tensor, state: ConvState) -> torch.Tensor:
        self._check(x)
        previous = state.previous
        if state.first is not None:
            previous = torch.where(state.first.view(-1, 1, 1), x[..., :1], previous)
            state.first.zero_()
        x = torch.cat([previous, x], dim=-1)
        if self.padding:
            state.previous.copy_(x[..., x.shape[-1] - self.padding:])
        return self._run(x)


class StreamingConv1d(_CausalBase):
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
        if dilation != 1:
            raise ValueError("dilated convolutions are not used by Mimi and not supported")
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.padding = kernel_size - stride
        self.pad_mode = pad_mode

    def _weights(self):
        conv = self.conv.conv
        return conv.weight, conv.bias, conv.stride[0], conv.groups


class StreamingConvTranspose1d(_CausalBase):
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
        if kernel_size % stride:
            raise ValueError(f"kernel {kernel_size} must be a multiple of the stride {stride}")
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.taps = kernel_size // stride
        self.padding = self.taps - 1
        self._subpixel: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _apply(self, fn, recurse=True):
        self._subpixel = None  # moves and casts invalidate the derived weights
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._subpixel = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _weights(self):
        convtr = self.convtr.convtr
        stride, groups = convtr.stride[0], convtr.groups
        if self._subpixel is None:
            # [C_in, C_out/g, taps * S] -> [C_out * S, C_in/g, taps], taps reversed, so that
            # output channel o*S + j of the conv is phase j of transposed-conv channel o.
            c_in, c_out_g, _ = convtr.weight.shape
            w = convtr.weight.detach().view(groups, c_in // groups, c_out_g, self.taps, stride)
            w = w.flip(3).permute(0, 2, 4, 1, 3).reshape(groups * c_out_g * stride, c_in // groups, self.taps)
            b = None if convtr.bias is None else convtr.bias.detach().repeat_interleave(stride)
            self._subpixel = (w.contiguous(), b)
        w, b = self._subpixel
        return w, b, 1, groups

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        B, C, T = y.shape
        stride = self.convtr.convtr.stride[0]
        return y.view(B, C // stride, stride, T).transpose(2, 3).reshape(B, C // stride, T * stride)

    def _check(self, x: torch.Tensor) -> None:
        pass  # any number of input frames is valid
