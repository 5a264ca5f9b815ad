"""SEANet convolutional encoder and decoder of Mimi (causal, streaming)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from moshi_core.nn.conv import CausalConv, StreamingConv1d, StreamingConvTranspose1d
from moshi_core.nn.streaming import StateGroup


@dataclass
class SeanetConfig:
    """Official keys of Kyutai's `seanet` config; only the values Mimi uses are supported."""

    channels: int = 1
    dimension: int = 512
    causal: bool = True
    n_filters: int = 64
    n_residual_layers: int = 1
    activation: str = "ELU"
    compress: int = 2
    dilation_base: int = 2
    disable_norm_outer_blocks: int = 0
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    norm: str = "none"
    pad_mode: str = "constant"
    ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    true_skip: bool = True

    def __post_init__(self) -> None:
        unsupported = {
            "n_residual_layers": (self.n_residual_layers, 1),  # more would need dilated convs
            "causal": (self.causal, True),
            "activation": (self.activation, "ELU"),
            "norm": (self.norm, "none"),
            "true_skip": (self.true_skip, True),
        }
        for key, (value, expected) in unsupported.items():
            if value != expected:
                raise ValueError(f"seanet.{key}={value!r} is not supported (only {expected!r})")

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


class ResnetBlock(nn.Module):
    """x + conv(elu(conv(elu(x)))): kernel k then 1, hidden dim // compress, identity skip."""

    def __init__(self, dim: int, kernel_size: int, compress: int, pad_mode: str) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            nn.ELU(),  # not in place: x is still needed for the skip
            StreamingConv1d(dim, hidden, kernel_size, pad_mode=pad_mode),
            nn.ELU(inplace=True),
            StreamingConv1d(hidden, dim, 1, pad_mode=pad_mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)

    def init_state(self, batch_size: int) -> StateGroup:
        return _init_states(self.block, batch_size)

    def step(self, x: torch.Tensor, state: StateGroup) -> torch.Tensor:
        return x + _step_all(self.block, x, state)


def _init_states(layers: nn.Module, batch_size: int) -> StateGroup:
    return StateGroup([
        layer.init_state(batch_size) if hasattr(layer, "init_state") else None for layer in layers
    ])


def _step_all(layers: nn.Module, x: torch.Tensor, state: StateGroup) -> torch.Tensor:
    """One streaming step of `layers`; an ELU just before a conv is left to that conv, which
    applies it while building its input window (one pass over the activations, not three)."""
    layers = list(layers)
    for i, (layer, layer_state) in enumerate(zip(layers, state.children)):
        if _fused_elu(layer, layers[i + 1] if i + 1 < len(layers) else None):
            continue
        if layer_state is None:
            x = layer(x)
        elif isinstance(layer, CausalConv):
            x = layer.step(x, layer_state, elu=i > 0 and _fused_elu(layers[i - 1], layer))
        else:
            x = layer.step(x, layer_state)
    return x


def _fused_elu(layer: nn.Module, following: nn.Module | None) -> bool:
    return isinstance(layer, nn.ELU) and layer.alpha == 1.0 and isinstance(following, CausalConv)


class _SeanetStack(nn.Module):
    """A `model` list of layers (indices as in the checkpoints) run offline or streaming.

    Activations are channels-last, [B, T, C], as the convs expect. The layers split in two
    at `low_rate`: the encoder's layers from it on, the decoder's before it, run at 200 Hz
    and below (Mimi's), where a long pass pays (matrix products of many rows), while the
    layers at the higher rates are faster in short ones (their activations stay in cache).
    """

    model: nn.Sequential
    low_rate: int  # the index of the layer where the split falls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def init_state(self, batch_size: int) -> StateGroup:
        return _init_states(self.model, batch_size)

    def step(self, x: torch.Tensor, state: StateGroup, part: slice = slice(None)) -> torch.Tensor:
        """A streaming step of the layers `part` (all by default: `head` and `tail` name the two
        halves), continuing `state`."""
        if part == slice(None):
            return _step_all(self.model, x, state)
        return _step_all(list(self.model)[part], x, StateGroup(state.children[part]))

    @property
    def head(self) -> slice:
        return slice(None, self.low_rate)

    @property
    def tail(self) -> slice:
        return slice(self.low_rate, None)


def _residual_blocks(cfg: SeanetConfig, dim: int) -> list[nn.Module]:
    return [ResnetBlock(dim, cfg.residual_kernel_size, cfg.compress, cfg.pad_mode)]


class SeanetEncoder(_SeanetStack):
    """[B, T, channels] audio -> [B, T / hop, dimension] latent."""

    def __init__(self, cfg: SeanetConfig) -> None:
        super().__init__()
        mult = 1
        layers: list[nn.Module] = [
            StreamingConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, pad_mode=cfg.pad_mode)
        ]
        self.low_rate = 0
        for i, ratio in enumerate(reversed(cfg.ratios)):
            dim = mult * cfg.n_filters
            layers += _residual_blocks(cfg, dim)
            layers += [nn.ELU(inplace=True), StreamingConv1d(dim, dim * 2, 2 * ratio, stride=ratio, pad_mode=cfg.pad_mode)]
            mult *= 2
            if i == len(cfg.ratios) - 2:
                self.low_rate = len(layers)  # after the last downsampling but one
        layers += [
            nn.ELU(inplace=True),
            StreamingConv1d(mult * cfg.n_filters, cfg.dimension, cfg.last_kernel_size, pad_mode=cfg.pad_mode),
        ]
        self.model = nn.Sequential(*layers)


class SeanetDecoder(_SeanetStack):
    """[B, S, dimension] latent -> [B, S * hop, channels] audio (no final activation)."""

    def __init__(self, cfg: SeanetConfig) -> None:
        super().__init__()
        mult = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [
            StreamingConv1d(cfg.dimension, mult * cfg.n_filters, cfg.kernel_size, pad_mode=cfg.pad_mode)
        ]
        self.low_rate = 0
        for i, ratio in enumerate(cfg.ratios):
            if i == 1:
                self.low_rate = len(layers)  # before the second upsampling (its ELU included)
            dim = mult * cfg.n_filters
            layers += [nn.ELU(inplace=True), StreamingConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio)]
            layers += _residual_blocks(cfg, dim // 2)
            mult //= 2
        layers += [
            nn.ELU(inplace=True),
            StreamingConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode),
        ]
        self.model = nn.Sequential(*layers)
