"""Our C++ CPU kernels against PyTorch (the kernels exist where AVX2, FMA and F16C do)."""

import pytest
import torch
import torch.nn.functional as F

from moshi_core import cpu_kernels


@pytest.mark.parametrize("shape", [(2, 4, 12, 16), (1, 32, 3000, 128), (3, 16, 8, 64)])
def test_decode_attention_equals_sdpa(shape):
    B, H, C, D = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).bfloat16() for n in (1, C, C))
    allowed = torch.rand(B, C, generator=g) > 0.3
    allowed[-1] = False  # a slot with nothing to attend to gives zeros, as SDPA does
    got = cpu_kernels.decode_attention(q, k, v, allowed)
    if got is None:
        pytest.skip("no AVX2/FMA/F16C kernel on this machine")
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed[:, None, None])
    exact[-1] = 0
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None]).double()
    # Rounded to bfloat16 once, like SDPA's output: no further from the exact result than SDPA.
    assert (got.double() - exact).abs().max() <= max((sdpa - exact).abs().max(), 2 ** -8 * exact.abs().max())
    assert got.dtype == torch.bfloat16


def test_decode_attention_leaves_float32_and_several_steps_to_sdpa():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    assert cpu_kernels.decode_attention(q, k, k, torch.ones(1, 4, dtype=torch.bool)) is None
    q2 = torch.randn(1, 2, 2, 8).bfloat16()
    assert cpu_kernels.decode_attention(q2, k.bfloat16(), k.bfloat16(), torch.ones(1, 4, dtype=torch.bool)) is None
