"""Split residual vector quantizer of Mimi: 1 semantic codebook + N-1 acoustic ones.

Both parts read the same latent through their own 1x1 input projection (the acoustic RVQ
does not start from the semantic residual). Module nesting mirrors the checkpoints'
`rvq_*.vq.layers.{i}._codebook.*` keys.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moshi_core.kernels.build import kernel_for
from moshi_core.kernels.linear import SKINNY_MAX_ROWS, linear
from moshi_core.nn.derived import DerivedWeights


@dataclass
class QuantizerConfig:
    """Official keys of Kyutai's `quantizer` config."""

    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512
    n_q_semantic: int = 1


class EuclideanCodebook(nn.Module):
    """Centroids stored as EMA sums and counts; the centroid is their ratio."""

    def __init__(self, dim: int, bins: int, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def embedding(self) -> torch.Tensor:
        return self.embedding_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]


class _CodebookLayer(nn.Module):
    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self._codebook = EuclideanCodebook(dim, bins)


class _CodebookStack(nn.Module):
    def __init__(self, n_q: int, dim: int, bins: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_CodebookLayer(dim, bins) for _ in range(n_q)])


class ResidualVectorQuantizer(DerivedWeights):
    def __init__(self, n_q: int, dim: int, bins: int, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(input_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, output_dim, 1, bias=False)
        self.vq = _CodebookStack(n_q, dim, bins)

    @property
    def n_q(self) -> int:
        return len(self.vq.layers)

    def _lookup_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroids [n_q, bins, dim] and, for distances, [n_q, bins, dim + 2] = [e, 1, |e|^2]."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            centroids = torch.stack([layer._codebook.embedding() for layer in self.vq.layers])
            ones = centroids.new_ones(*centroids.shape[:-1], 1)
            return centroids, torch.cat([centroids, ones, centroids.pow(2).sum(-1, keepdim=True)], dim=-1)

        return self._cached("tables", build)

    def _coarse_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The centroids rounded to float16 and their norms [n_q, bins], for our kernel's
        first pass over a level (see `encode`)."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            centroids, padded = self._lookup_tables()
            return centroids.half(), padded[..., -1].sqrt().contiguous()

        return self._cached("coarse", build)

    def derive_weights(self) -> None:
        """Build the lookup tables now rather than in the first step (see `MimiModel.init_state`)."""
        centroids, _ = self._lookup_tables()
        if centroids.device.type == "cpu" and centroids.dtype == torch.float32:
            self._coarse_tables()

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """[B, T, input_dim] -> codes [B, n_q, T]: greedy nearest centroid on the residual.

        Distances are sqrt(|x|^2 - 2 x.e + |e|^2) with the squares as one product of padded
        rows, the way `torch.cdist` computes them, with the centroid side precomputed once;
        the argmin therefore matches Kyutai's (which calls cdist) bit for bit. A streaming
        step's few rows on CPU take our kernel (`csrc/rvq.cpp`), which finds the same codes
        from a float16 pass over each level's centroids, at half the bytes.
        """
        B, T, _ = x.shape
        residual = F.linear(x.reshape(B * T, -1), self.input_proj.weight[..., 0])
        centroids, padded = self._lookup_tables()
        kernel = _codes_kernel(residual, centroids)
        if kernel is not None:
            coarse, norms = self._coarse_tables()
            codes = kernel.rvq_codes(residual, centroids, padded, coarse, norms, n_q)
            return codes.view(B, T, n_q).transpose(1, 2)
        ones = residual.new_ones(residual.shape[0], 1)
        codes = []
        for level in range(n_q):
            query = torch.cat([residual.mul(-2), residual.pow(2).sum(-1, keepdim=True), ones], dim=-1)
            index = (query @ padded[level].T).clamp_min_(0).sqrt_().argmin(dim=-1)
            residual = residual - centroids[level][index]
            codes.append(index)
        return torch.stack(codes, dim=-1).view(B, T, n_q).transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> [B, T, output_dim]; levels are summed before the projection."""
        centroids = self._lookup_tables()[0]
        levels = torch.arange(codes.shape[1], device=codes.device)[:, None, None]
        quantized = centroids[levels, codes.transpose(0, 1).long()].sum(0)  # [K, B, T, dim] -> [B, T, dim]
        return linear(quantized, self.output_proj.weight[..., 0])


def _codes_kernel(residual: torch.Tensor, centroids: torch.Tensor):
    """Our codes kernel for a streaming step's few float32 rows on CPU, else None."""
    if (residual.shape[0] > SKINNY_MAX_ROWS or residual.dtype != torch.float32 or centroids.dtype != torch.float32
            or torch.is_grad_enabled()):
        return None
    return kernel_for(residual)


class SplitResidualVectorQuantizer(nn.Module):
    """Latents [B, T, 512] <-> codes [B, K, T]."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_sem = cfg.n_q_semantic
        args = (cfg.dimension, cfg.bins, cfg.input_dimension, cfg.output_dimension)
        self.rvq_first = ResidualVectorQuantizer(n_sem, *args)
        self.rvq_rest = ResidualVectorQuantizer(cfg.n_q - n_sem, *args)

    def encode(self, x: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        n_sem = self.cfg.n_q_semantic
        codes = self.rvq_first.encode(x, n_sem)
        if num_codebooks > n_sem:
            codes = torch.cat([codes, self.rvq_rest.encode(x, num_codebooks - n_sem)], dim=1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        n_sem = self.cfg.n_q_semantic
        out = self.rvq_first.decode(codes[:, :n_sem])
        if codes.shape[1] > n_sem:
            out = out + self.rvq_rest.decode(codes[:, n_sem:])
        return out
