"""Causal 1-D convolutions on channels-last activations [B, T, C], offline and streaming.

A causal conv pads `kernel - stride` samples on the left (zeros, or copies of the first
sample in `replicate` mode) and none on the right; streaming keeps those last input samples
between calls. A causal transposed conv keeps the first `stride * frames` output samples.

Every conv here has a kernel that is a whole number `n` of strides `s`. Seen channels-last,
the input is then a sequence of frames of `s * C` contiguous values, and the conv is a
stride-1 conv of `n` taps over those frames (`tap_conv`): the sum of `n` matrix products of
shifted windows with `n` weight matrices, no im2col copy. A live step of a few rows runs it
as those products (our skinny kernel); a longer call as the vendor's direct convolution, to
which channels-last frames are NHWC input as they lie. The plain convs keep their weight in
tap-major order: the parameter Kyutai's checkpoints name `[C_out, C_in, k]` is a strided view
of it, so it loads unchanged.

A transposed conv is the same thing in reverse (sub-pixel convolution): `n` taps produce
`s * C_out` values per input frame, which are `s` output samples. Its streaming state is
then input history, like any conv's.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moshi_core.kernels.build import kernel_for
from moshi_core.kernels.linear import linear, skinny_kernel
from moshi_core.nn.derived import DerivedWeights
from moshi_core.nn.streaming import keep_mask


@dataclass
class ConvState:
    previous: torch.Tensor  # [B, P, C_in]: last P input samples
    first: torch.Tensor | None  # [B] bool: replicate padding not taken yet (replicate mode only)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        self.previous.mul_(keep_mask(mask, 3))
        if self.first is not None:
            self.first.copy_(torch.ones_like(self.first) if mask is None else self.first | mask)

    def take(self, rows: torch.Tensor) -> "ConvState":
        return ConvState(self.previous[rows], None if self.first is None else self.first[rows])

    def put(self, rows: torch.Tensor, part: "ConvState") -> None:
        self.previous[rows] = part.previous
        if self.first is not None:
            self.first[rows] = part.first

    def tensors(self) -> list[torch.Tensor]:
        return [self.previous] if self.first is None else [self.previous, self.first]


Derived = Callable[[str, Callable[[], torch.Tensor]], torch.Tensor]  # a module's cache of re-laid-out taps


# Up to this many output steps a CPU conv is a GEMM per tap (see `tap_conv`).
TAP_GEMM_MAX_STEPS = 1024


def tap_conv(frames: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, derived: Derived) -> torch.Tensor:
    """sum_m frames[:, t + m] @ taps[m] (+ bias): frames [B, T + n - 1, D], taps [n, D, E] -> [B, T, E].

    A streaming call has a few rows (two steps of the deepest layers per frame): then each
    output step is one row of `n * D` inputs, its window, copied out, and the taps are one
    row-major matrix [E, n * D] (made once), through the skinny kernel, which reads each
    weight once where a GEMM packs them on every call. One product of long rows, not a
    product per tap: the decoder's first conv (7 taps) 0.97 -> 0.76 ms a step from memory,
    its first transposed conv 1.70 -> 1.53 (a 2-core EPYC, alternating).

    Long calls at the high sample rates are a stride-1 conv of `n` taps over the frames:
    channels-last frames are a 2-D
    conv's NHWC input as they are, so the vendor's direct convolution (oneDNN on CPUs, cuDNN)
    runs without a copy, and 2-4x faster than a GEMM per tap (measured on a 2-core AVX-512
    EPYC, Mimi's layers). Calls of a few hundred steps (the deep layers offline) are a GEMM
    per tap: at their thousands of channels the direct convolution ran at half the GEMM's speed
    (a 4 s chunk of Mimi's widest conv: 30 ms against 14, on a 2-core Xeon with AVX-512).
    """
    n, D, E = taps.shape
    B, steps = frames.shape[0], frames.shape[1] - n + 1
    if skinny_kernel(frames, B * steps) is not None and not torch.is_grad_enabled():
        weight = derived("windows", lambda: taps.detach().permute(2, 0, 1).reshape(E, n * D).contiguous())
        frames = frames.contiguous()
        windows = frames.as_strided((B, steps, n * D), (frames.stride(0), D, 1))  # overlapping rows
        return linear(windows, weight, bias)
    if steps <= TAP_GEMM_MAX_STEPS and frames.device.type == "cpu":
        start = frames.new_zeros(()) if bias is None else bias
        out = torch.baddbmm(start.expand(B, steps, E), frames[:, :steps], taps[0].expand(B, -1, -1))
        for m in range(1, n):
            out.baddbmm_(frames[:, m : m + steps], taps[m].expand(B, -1, -1))
        return out
    weight = derived("direct", lambda: direct_conv_weight(taps))
    out = F.conv2d(frames.transpose(1, 2)[:, :, None], weight, bias)  # [B, E, 1, T], NHWC
    return out[:, :, 0].transpose(1, 2)


def direct_conv_weight(taps: torch.Tensor) -> torch.Tensor:
    """Taps [n, D, E] as the direct convolution reads them: [E, D, 1, n] in channels-last memory."""
    return taps.detach().permute(2, 1, 0)[:, :, None].contiguous(memory_format=torch.channels_last)


def _window_kernel(x: torch.Tensor):
    """Our input-window kernel (`csrc/conv.cpp`) where it applies (float32 on CPU, inference), else None."""
    if x.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    return kernel_for(x)


class NormConv1d(nn.Module):
    """Holds a conv's `weight` and `bias` one level down, as in the checkpoints.

    `weight` is shaped `[C_out, C_in, k]` like `nn.Conv1d`'s but stored tap-major
    (`[k, C_in, C_out]` in memory), the order the tap GEMMs read.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Module()
        storage = torch.empty(kernel_size, in_channels, out_channels)
        self.conv.weight = nn.Parameter(storage.permute(2, 1, 0))
        self.conv.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = (in_channels * kernel_size) ** -0.5  # nn.Conv1d's init, for untrained use
        nn.init.uniform_(self.conv.weight, -bound, bound)
        if bias:
            nn.init.uniform_(self.conv.bias, -bound, bound)


class NormConvTranspose1d(nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.convtr = nn.ConvTranspose1d(*args, **kwargs)


class CausalConv(DerivedWeights):
    """Streaming logic shared by both convs: keep `padding` input samples per stream.

    Its re-laid-out taps are derived weights (`DerivedWeights`).
    """

    padding: int
    in_channels: int
    pad_mode: str = "constant"

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The conv of x [B, padding + L, C_in], left context included."""
        raise NotImplementedError

    def _dense_taps(self) -> torch.Tensor | None:
        """The taps [n, D, E] that `tap_conv` takes, or None (a depthwise conv has none)."""
        raise NotImplementedError

    def derive_weights(self) -> None:
        """Build the taps' direct-convolution layout now, as a step on a GPU or a long call
        reads it, rather than inside the first step (see `MimiModel.init_state`)."""
        taps = self._dense_taps()
        if taps is not None:
            self._cached("direct", lambda: direct_conv_weight(taps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Offline: x [B, L, C_in] from the start of the stream."""
        if self.pad_mode == "replicate":
            x = torch.cat([x[:, :1].expand(-1, self.padding, -1), x], dim=1)
        else:
            x = F.pad(x, (0, 0, self.padding, 0))
        return self._run(x)

    def init_state(self, batch_size: int) -> ConvState:
        ref = next(self.parameters())
        previous = ref.new_zeros(batch_size, self.padding, self.in_channels)
        first = None
        if self.pad_mode == "replicate":
            first = torch.ones(batch_size, dtype=torch.bool, device=ref.device)
        return ConvState(previous, first)

    def step(self, x: torch.Tensor, state: ConvState, elu: bool = False) -> torch.Tensor:
        """The next samples x [B, L, C_in] of the streams; `elu`: through an ELU first (the
        SEANet's, applied here as the input window is built, in one pass with our kernel)."""
        kernel = _window_kernel(x)
        # Replicate padding matters only until each stream's first step: then the plain window.
        if kernel is not None and (state.first is None or not state.first.any()):
            return self._run(kernel.elu_window(x, state.previous, elu))
        if elu:
            x = F.elu(x)
        previous = state.previous
        if state.first is not None:
            previous = torch.where(state.first.view(-1, 1, 1), x[:, :1], previous)
            state.first.zero_()
        x = torch.cat([previous, x], dim=1)
        if self.padding:
            state.previous.copy_(x[:, x.shape[1] - self.padding :])
        return self._run(x)


class StreamingConv1d(CausalConv):
    """Causal conv with kernel a multiple of its stride (all of Mimi's are)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', not {pad_mode!r}")
        if kernel_size % stride:
            raise ValueError(f"kernel {kernel_size} must be a multiple of the stride {stride}")
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, bias)
        self.in_channels, self.stride = in_channels, stride
        self.padding = kernel_size - stride
        self.pad_mode = pad_mode

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        if L % self.stride:
            raise ValueError(f"input length {L - self.padding} is not a multiple of the stride {self.stride}")
        frames = x.reshape(B, L // self.stride, self.stride * C)
        return tap_conv(frames, self._dense_taps(), self.conv.conv.bias, self._cached)

    def _dense_taps(self) -> torch.Tensor:
        weight = self.conv.conv.weight  # [C_out, C_in, k], stored as [k, C_in, C_out]
        k, c_in, c_out = weight.shape[2], weight.shape[1], weight.shape[0]
        return weight.permute(2, 1, 0).reshape(k // self.stride, self.stride * c_in, c_out)  # a view


class StreamingConvTranspose1d(CausalConv):
    """Causal transposed conv (kernel a multiple of the stride), as a sub-pixel conv.

    `groups` may be 1 or the number of channels (depthwise, as Mimi's upsampling).
    """

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
        if groups not in (1, in_channels) or (groups > 1 and in_channels != out_channels):
            raise ValueError("only dense or depthwise transposed convs are supported")
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.in_channels, self.stride, self.taps = in_channels, stride, kernel_size // stride
        self.padding = self.taps - 1

    def _subpixel_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Taps [n, C_in, S * C_out] (or [n, S, C] depthwise), reversed in time, and the bias."""
        convtr, n, s = self.convtr.convtr, self.taps, self.stride
        w = convtr.weight.detach()  # [C_in, C_out / groups, n * s]
        if convtr.groups == 1:
            taps = w.view(w.shape[0], w.shape[1], n, s).permute(2, 0, 3, 1).flip(0)
            taps = taps.reshape(n, w.shape[0], s * w.shape[1])
        else:
            taps = w.view(w.shape[0], n, s).permute(1, 2, 0).flip(0)  # [n, S, C]
        bias = None if convtr.bias is None else convtr.bias.detach().repeat(s)
        return taps.contiguous(), bias

    def _dense_taps(self) -> torch.Tensor | None:
        taps, _ = self._cached("subpixel", self._subpixel_weights)
        return taps if self.convtr.convtr.groups == 1 else None

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        taps, bias = self._cached("subpixel", self._subpixel_weights)
        B, L, C = x.shape
        steps = L - self.padding
        if self.convtr.convtr.groups == 1:
            out = tap_conv(x, taps, bias, self._cached)  # [B, T, S * C_out], phase-major per frame
        else:
            out = sum(x[:, m : m + steps, None, :] * taps[m] for m in range(self.taps))  # [B, T, S, C]
            if bias is not None:
                out = out + bias.view(self.stride, -1)
        return out.reshape(B, steps * self.stride, -1)
