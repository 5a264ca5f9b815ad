"""Our quantizer kernel (`csrc/rvq.cpp`) picks the centroid Kyutai's `torch.cdist` picks, always.

Its first pass reads float16 centroids and its second float32 in its own summation order, so
these tests aim at where either could disagree with cdist: exact and near ties (below the
float32 rounding of the distances), orders that the float16 rounding reverses, a residual
equal to a centroid (distances clamped at zero), values beyond float16's range or below its
normal range, and rows that are not finite.
"""

import pytest
import torch

from moshi_core.kernels import build as cpu_kernels
from moshi_core.nn.rvq import ResidualVectorQuantizer

BINS, DIM = 2048, 256


def cdist_codes(x: torch.Tensor, centroids: torch.Tensor, levels: int) -> torch.Tensor:
    """Kyutai's quantizer: at each level the argmin of `torch.cdist` to the residual."""
    residual, codes = x, []
    for level in range(levels):
        index = torch.cdist(residual[None], centroids[level][None])[0].argmin(-1)
        residual = residual - centroids[level][index]
        codes.append(index)
    return torch.stack(codes, dim=-1)


def quantizer(centroids: torch.Tensor) -> ResidualVectorQuantizer:
    """A quantizer (identity input projection) whose centroids are exactly `centroids`."""
    levels, bins, dim = centroids.shape
    rvq = ResidualVectorQuantizer(levels, dim, bins, dim, dim)
    with torch.no_grad():
        rvq.input_proj.weight.copy_(torch.eye(dim)[..., None])
        for layer, table in zip(rvq.vq.layers, centroids):
            layer._codebook.embedding_sum.copy_(table)  # usage 1: the sums are the centroids
    rvq.derive_weights()
    return rvq


def codes_both_ways(rvq: ResidualVectorQuantizer, x: torch.Tensor, levels: int, monkeypatch) -> tuple:
    with torch.inference_mode():
        ours = rvq.encode(x[None], levels)[0].T
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
        portable = rvq.encode(x[None], levels)[0].T
        monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    return ours, portable


def hard_level(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A level of centroids and 16 residuals built to sit on every edge of the kernel's bounds."""
    centroids = torch.randn(BINS, DIM, generator=g)
    rows = []
    # an exact tie: cdist takes the lower index
    centroids[900] = centroids[5]
    rows.append(centroids[5] + 0.01 * torch.randn(DIM, generator=g))
    # centroids a few units in the last place apart, where only cdist's own rounding decides
    centre = centroids[6].clone()
    for j in range(6, 14):
        ulps = torch.randint(-3, 4, (DIM,), generator=g).float()
        centroids[j] = centre * (1 + ulps * 2.0**-23)
    rows += [centre * (1 + 2.0**-22 * torch.randn(DIM, generator=g)) for _ in range(4)]
    # a cluster whose gaps are below float16's rounding of the centroids but above float32's
    base = torch.randn(DIM, generator=g)
    centroids[20:60] = base + 0.005 * torch.randn(40, DIM, generator=g)
    rows += [base + 0.005 * torch.randn(DIM, generator=g) for _ in range(5)]
    # far from the origin, where even float32 rounding is large against the gaps
    far = 40 + torch.randn(DIM, generator=g)
    centroids[60:90] = far + 0.02 * torch.randn(30, DIM, generator=g)
    rows.append(far + 0.02 * torch.randn(DIM, generator=g))
    # a residual that is a centroid: its distance is rounded to zero or below, then clamped
    rows.append(centroids[100].clone())
    # below float16's normal range
    centroids[200:210] = 1e-6 * torch.randn(10, DIM, generator=g)
    rows.append(1e-6 * torch.randn(DIM, generator=g))
    # plain rows of the scale of the centroids
    rows += [torch.randn(DIM, generator=g) for _ in range(16 - len(rows))]
    return centroids, torch.stack(rows)


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_codes_are_cdists_on_random_levels(kernel, rows, monkeypatch):
    g = torch.Generator().manual_seed(rows)
    centroids = torch.randn(8, BINS, DIM, generator=g)
    x = 1.5 * torch.randn(rows, DIM, generator=g)
    ours, portable = codes_both_ways(quantizer(centroids), x, 8, monkeypatch)
    assert torch.equal(ours, cdist_codes(x, centroids, 8))
    assert torch.equal(ours, portable)


@pytest.mark.parametrize("seed", range(6))
def test_codes_are_cdists_at_ties_and_range_edges(kernel, seed, monkeypatch):
    g = torch.Generator().manual_seed(100 + seed)
    first, x = hard_level(g)
    second, _ = hard_level(g)
    centroids = torch.stack([first, second])
    rvq = quantizer(centroids)
    for row in x.split(1):  # one row at a time (a single stream), and all 16 together
        ours, _ = codes_both_ways(rvq, row, 2, monkeypatch)
        assert torch.equal(ours, cdist_codes(row, centroids, 2))
    ours, portable = codes_both_ways(rvq, x, 2, monkeypatch)
    assert torch.equal(ours, cdist_codes(x, centroids, 2))
    assert torch.equal(ours, portable)


def test_codes_are_cdists_where_float16_rounding_reverses_the_order(kernel, monkeypatch):
    """Centroid A is the nearer, but every weight of A rounds down to float16 and every one of
    B up, so that the float16 distances put B first by more than float32's error bound."""
    g = torch.Generator().manual_seed(11)
    unit = 2.0**-10  # float16's spacing in [1, 2)
    base = 1 + torch.randint(0, 1000, (DIM,), generator=g) * unit
    shift = 0.034 * torch.randn(DIM, generator=g)
    a = base + 0.49 * unit
    b = (base + shift).half().float() + 0.51 * unit
    x = (a + 0.044 * torch.randn(DIM, generator=g))[None]
    centroids = torch.randn(1, BINS, DIM, generator=g)
    centroids[0, 300], centroids[0, 301] = a, b
    exact = centroids[0, 300:302].double()
    coarse = -2 * x.double() @ exact.half().double().T + exact.pow(2).sum(-1)  # |x|^2 left out
    assert (-2 * x.double() @ exact.T + exact.pow(2).sum(-1)).argmin() == 0 and coarse.argmin() == 1
    ours, portable = codes_both_ways(quantizer(centroids), x, 1, monkeypatch)
    assert ours.item() == 300
    assert torch.equal(ours, cdist_codes(x, centroids, 1))


def test_codes_are_cdists_beyond_float16_and_for_rows_not_finite(kernel, monkeypatch):
    g = torch.Generator().manual_seed(7)
    centroids = torch.randn(2, BINS, DIM, generator=g)
    centroids[0, 3] = 1e5  # beyond float16's largest value
    x = torch.randn(4, DIM, generator=g)
    x[1] = 1e5 + torch.randn(DIM, generator=g)
    ours, portable = codes_both_ways(quantizer(centroids), x, 2, monkeypatch)
    assert ours[1, 0] == 3
    assert torch.equal(ours, cdist_codes(x, centroids, 2))
    x[2, 10] = float("nan")
    ours, portable = codes_both_ways(quantizer(centroids), x, 2, monkeypatch)
    assert torch.equal(ours, portable)


def test_an_all_zero_codebook_gives_index_zero(kernel, monkeypatch):
    """An untrained checkpoint's centroids are all zero: every distance ties."""
    centroids = torch.zeros(3, BINS, DIM)
    x = torch.randn(2, DIM, generator=torch.Generator().manual_seed(3))
    ours, _ = codes_both_ways(quantizer(centroids), x, 3, monkeypatch)
    assert torch.equal(ours, torch.zeros(2, 3, dtype=torch.long))
