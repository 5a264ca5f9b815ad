"""Q8_0 weights (in the CPU tiles) times int8 activations (GGUF runtimes' arithmetic) in
`csrc/linear.cpp`: bit for bit against a float64 model of the same arithmetic, and on a small
LM against the strict float path (the kernels exist where AVX2, FMA and F16C do; elsewhere
these skip)."""

import numpy as np
import pytest
import torch
from oracle import REDUCED_7B, official_state_dict, random_reference_lm, write_candle_gguf

from moshi_core.kernels import q8
from moshi_core.loading.checkpoints import load_lm
from moshi_core.models.lm import LMConfig


# The float64 model. Every float32 operation of the kernel is one float64 operation rounded to
# float32, which rounds as float32 itself would (53 >= 2 * 24 + 2 bits: no double-rounding
# error for +, *, /), except the fused multiply-adds, done exactly below.

def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def _quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF's quantize_row_q8_0: d = max|x| / 127, q = roundf(x * (1 / d)), halves away from zero; d kept float32."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = _f32(np.abs(blocks).max(-1) / 127)
    inverse = np.where(d != 0, _f32(1 / np.where(d != 0, d, 1)), 0.0)
    scaled = _f32(blocks * inverse[..., None])
    return (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).reshape(x.shape), d


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c) where a * b is exact in float64 (a float32, |b| < 2^29): the float64
    sum s and its error e (TwoSum) give the exact value; rounding s to float32 is right unless s
    is a float32 midpoint and e breaks the tie."""
    p = a * b
    s = p + c
    v = s - p
    e = (p - (s - v)) + (c - v)
    nearest = s.astype(np.float32)
    other = np.nextafter(nearest, np.where(s > nearest, np.inf, -np.inf).astype(np.float32))
    r, o = nearest.astype(np.float64), other.astype(np.float64)
    tie = (r != s) & ((r + o) / 2 == s) & ((o - r) * e > 0)
    return np.where(tie, o, r)


def q8_int8_model(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """The kernel's int8 arithmetic, GGUF's: each block's exact integer dot, accumulated block
    after block in float32 by fma(d_w * d_x, dot, acc)."""
    q, dx = _quantize_q8(x.double().numpy())
    w = qs.double().numpy()
    (m, k), o = x.shape, w.shape[0]
    dots = (w.reshape(1, o, k // 32, 32) * q.reshape(m, 1, k // 32, 32)).sum(-1)  # exact in float64
    scale = _f32(scales.double().numpy()[None] * dx[:, None])  # [m, o, blocks]
    acc = np.zeros((m, o))
    for b in range(k // 32):
        acc = _fma32(scale[..., b], dots[..., b], acc)
    return acc


def _random_q8(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qs = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=g)  # -128 too: a file may hold it
    return qs, (torch.rand(rows, cols // 32, generator=g) * 0.02).half()


def _activations(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols // 32, 1, generator=g).repeat_interleave(32, 1)[..., 0]
    x[0, :32] = 0  # an all-zero block: d = 0
    if cols >= 64:  # a block whose max is 127, so d = 1 and x * (1 / d) = x: ties at .5 round away from zero
        x[-1, 32:64] = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5, 3.5] + [0.25] * 26)
    return x


def _product(kernel, x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, int8: bool = True) -> torch.Tensor:
    """x @ Wᵀ by the kernel, W = (qs, scales) laid out in tiles as a model's weights are at load."""
    tiled = q8.Q8Tiles.of(q8.Q8Tensor(qs, scales))
    return kernel.q8_tiles_linear(x, tiled.tiles, tiled.scales, tiled.rows, int8)


def _cpu_instructions() -> list[str]:
    flags = set(open("/proc/cpuinfo").read().split())
    return ["avx2"] + ["avx-vnni"] * ("avx_vnni" in flags) + ["avx512-vnni"] * ({"avx512f", "avx512bw", "avx512_vnni"} <= flags)


@pytest.fixture(params=_cpu_instructions())
def instructions(kernel, request):
    """Each int8 dot-product path this CPU can run, in turn."""
    best = kernel.q8_int8_instructions()
    assert kernel.q8_use_int8_instructions(request.param) == request.param
    yield request.param
    kernel.q8_use_int8_instructions(best)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
def test_int8_product_is_the_float64_model_bit_for_bit(kernel, instructions, rows, threads):
    g = torch.Generator().manual_seed(rows * 10 + threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # outputs: a partial tile of 16 rows (under 8, over 8), whole tiles, a long row, many tiles
        for out, inner in ((7, 32), (13, 64), (20, 96), (67, 4096), (1031, 256), (64, 544)):
            qs, scales = _random_q8(out, inner, g)
            x = _activations(rows, inner, g)
            got = _product(kernel, x, qs, scales)
            assert got.dtype == torch.float32 and got.shape == (rows, out)
            np.testing.assert_array_equal(got.double().numpy(), q8_int8_model(x, qs, scales))
    finally:
        torch.set_num_threads(previous)


def test_an_instruction_set_this_cpu_lacks_is_refused(kernel):
    assert kernel.q8_use_int8_instructions("avx1024") == kernel.q8_int8_instructions()


def test_quantized_activations_round_halves_away_from_zero(kernel):
    """roundf's rule, not the vector unit's halves-to-even: with max|x| = 127 (so d = 1) and the
    identity as weights, the product is the quantized row itself."""
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 3.5, 0.25, -0.75] + [0.0] * 24])
    identity = torch.eye(32, dtype=torch.int8)
    q = _product(kernel, x, identity, torch.ones(32, 1, dtype=torch.float16))
    assert q[0, :8].tolist() == [127, 1, -1, 2, -3, 4, 0, -1]
    assert _quantize_q8(x.double().numpy())[0][0, :8].tolist() == q[0, :8].tolist()


def test_int8_product_in_bfloat16_is_the_float32_one_rounded(kernel):
    g = torch.Generator().manual_seed(0)
    qs, scales = _random_q8(40, 512, g)
    x = _activations(3, 512, g).bfloat16()
    got = _product(kernel, x, qs, scales)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, _product(kernel, x.float(), qs, scales).bfloat16())


def test_int8_rows_give_the_same_bits_alone_or_in_a_batch(kernel):
    g = torch.Generator().manual_seed(1)
    qs, scales = _random_q8(777, 1024, g)
    x = _activations(7, 1024, g)
    alone = torch.cat([_product(kernel, r, qs, scales) for r in x.split(1)])
    assert torch.equal(_product(kernel, x, qs, scales), alone)


def test_the_switch_picks_the_arithmetic(kernel, monkeypatch):
    g = torch.Generator().manual_seed(2)
    qs, scales = _random_q8(64, 256, g)
    tiled = q8.Q8Tiles.of(q8.Q8Tensor(qs, scales))
    weight = q8.TiledQ8Weight(tiled.tiles, tiled.scales, tiled.rows, dtype=torch.float32)
    x = _activations(2, 256, g)
    monkeypatch.setattr(q8, "INT8_ACTIVATIONS", True)
    int8 = weight(x)
    q8.set_int8_activations(False)
    strict = weight(x)
    assert torch.equal(int8, _product(kernel, x, qs, scales, True))
    assert torch.equal(strict, _product(kernel, x, qs, scales, False)) and not torch.equal(int8, strict)


def test_the_instructions_named_are_this_cpus(kernel):
    flags = set(open("/proc/cpuinfo").read().split())
    expected = "avx512-vnni" if {"avx512f", "avx512bw", "avx512_vnni"} <= flags else "avx-vnni" if "avx_vnni" in flags else "avx2"
    assert kernel.q8_int8_instructions() == expected


# On a small LM: int8 against the strict float arithmetic, same weights.
CONFIG = dict(REDUCED_7B, dim=128)  # dim 128: the temporal transformer's matrices are Q8_0


@pytest.fixture(scope="module")
def int8_lm(tmp_path_factory):
    path = write_candle_gguf(tmp_path_factory.mktemp("gguf") / "model.q8.gguf", official_state_dict(random_reference_lm(CONFIG)), 8)
    return load_lm(path, LMConfig.from_dict(CONFIG), dtype=torch.float32)


def _forward(model, int8: bool, monkeypatch):
    """The LM over 60 steps of two streams (teacher-forced: every step sees the same codes)."""
    monkeypatch.setattr(q8, "INT8_ACTIVATIONS", int8)
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randint(0, 100, (2, 1, 60), generator=g), torch.randint(0, 64, (2, 16, 60), generator=g)], 1)
    with torch.no_grad():
        return model(codes)


def test_int8_lm_logits_and_greedy_tokens_stay_close_to_the_strict_ones(kernel, int8_lm, monkeypatch):
    """Same int8 weights, activations rounded to 8 bits per block. Measured on three random
    LMs: logits within 2.0-2.6% of their largest magnitude (the bound: 4%; Q8_0 weights alone
    move them by up to 5%, tests/core/loading/test_gguf.py), and the same greedy token at
    97.5-99% of the 120 text and 97-98% of the 946 audio positions (the bound: 95%), as the
    strict Q8 model agrees with the unquantized one (96-99%, 97%). A free-running greedy loop
    is no measure on a random LM: its logits are so flat that it diverges after 1-2 steps,
    for Q8_0 weights against unquantized ones too, then agrees on 10-20% of 60 steps by chance."""
    int8, strict = _forward(int8_lm, True, monkeypatch), _forward(int8_lm, False, monkeypatch)
    valid = ~strict.logits.isnan()
    scale = strict.logits[valid].abs().max()
    assert (int8.logits[valid] - strict.logits[valid]).abs().max() < 0.04 * scale
    assert (int8.text_logits - strict.text_logits).abs().nan_to_num().max() < 0.04 * strict.text_logits.nan_to_num().abs().max()
    assert (int8.logits - strict.logits).abs()[valid].max() > 1e-4 * scale  # the switch did change the arithmetic
    text_agree = (int8.text_logits.argmax(-1) == strict.text_logits.argmax(-1)).float().mean()
    positions = ~strict.logits.isnan().any(-1)
    audio_agree = (int8.logits.argmax(-1) == strict.logits.argmax(-1))[positions].float().mean()
    assert text_agree >= 0.95 and audio_agree >= 0.95, (text_agree, audio_agree)
