"""Our C++ CPU kernels against float64 references and against the PyTorch path they replace
(the kernels exist where AVX2, FMA and F16C do; elsewhere these tests skip)."""

import pytest
import torch
import torch.nn.functional as F

from moshi_core.kernels import build as cpu_kernels
from moshi_core.kernels import q8
from moshi_core.kernels.linear import SKINNY_MAX_ROWS, linear
from moshi_core.kernels.q8 import Q8Tensor, Q8Tiles, TiledQ8Weight
from moshi_core.nn.transformer import Transformer, TransformerConfig


def _random_q8(rows: int, cols: int, g: torch.Generator) -> TiledQ8Weight:
    qs = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
    scales = (torch.rand(rows, cols // 32, generator=g) * 0.02).half()
    tiled = Q8Tiles.of(Q8Tensor(qs, scales))
    return TiledQ8Weight(tiled.tiles, tiled.scales, tiled.rows, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
def test_skinny_linear_is_the_product_in_float32(kernel, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    for out, inner in ((13, 64), (1030, 512), (8, 2048), (21, 88)):
        w = torch.randn(out, inner, generator=g).to(dtype)
        x = torch.randn(rows, inner, generator=g).to(dtype)
        bias = torch.randn(out, generator=g).to(dtype)
        got = kernel.skinny_linear(x, w, bias)
        exact = F.linear(x.double(), w.double(), bias.double())
        assert got.dtype == dtype and got.shape == (rows, out)
        # float32 sums, then one rounding to the output dtype
        rounding = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11 if dtype == torch.float16 else 0
        tolerance = (rounding + 1e-6) * exact.abs().max()
        assert (got.double() - exact).abs().max() <= tolerance


def test_a_row_gives_the_same_bits_alone_or_in_a_batch(kernel):
    """A conversation's numbers must not depend on who shares its batch (batched slots,
    batched jobs): every row is the same sum in the same order."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(777, 1024, generator=g).bfloat16()
    q8 = _random_q8(777, 1024, g)
    x = torch.randn(7, 1024, generator=g)
    for batched, alone in ((kernel.skinny_linear(x, w, None), [kernel.skinny_linear(r, w, None) for r in x.split(1)]),
                           (q8(x), [q8(r) for r in x.split(1)])):
        assert torch.equal(batched, torch.cat(alone))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_products_give_the_same_bits_on_any_number_of_threads(kernel, dtype):
    """The threads take chunks of rows as they come free: whoever computes a row, it is the
    same sum. Matrices of many chunks, with rows left over past the last whole tile."""
    g = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    try:
        for out, inner in ((4099, 512), (1030, 2048), (9, 64)):
            w = torch.randn(out, inner, generator=g).to(dtype)
            for rows in (1, 2, 3, 5):
                x = torch.randn(rows, inner, generator=g).to(dtype)
                results = []
                for threads in (1, 2, 1, 2):
                    torch.set_num_threads(threads)
                    results.append(kernel.skinny_linear(x, w, None))
                assert all(torch.equal(results[0], r) for r in results[1:]), (out, inner, rows)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("rows", [1, 2, 4, 9])
def test_q8_linear_is_the_dequantized_product(kernel, rows, monkeypatch):
    """The strict arithmetic (the int8 one has its own tests, in test_q8_int8.py)."""
    monkeypatch.setattr(q8, "INT8_ACTIVATIONS", False)
    g = torch.Generator().manual_seed(rows)
    w = _random_q8(300, 1024, g)
    x = torch.randn(rows, 1024, generator=g)
    exact = F.linear(x.double(), w.dequantize(torch.float64))
    for dtype in (torch.float32, torch.bfloat16):
        got = w(x.to(dtype))
        assert got.dtype == dtype
        rounding = 2 ** -8 if dtype == torch.bfloat16 else 0
        assert (got.double() - exact).abs().max() <= (rounding + 1e-6) * exact.abs().max() + 1e-3 * rounding


def test_linear_routes_only_what_the_kernel_computes(kernel, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    x = torch.randn(2, 96, generator=g)
    calls = []

    class Recorder:
        def skinny_linear(self, *args):
            calls.append("linear")
            return kernel.skinny_linear(*args)

    monkeypatch.setattr(cpu_kernels, "kernels", lambda: Recorder())
    with torch.no_grad():
        linear(x, w)
        assert calls == ["linear"]
        linear(torch.randn(SKINNY_MAX_ROWS + 1, 96), w)  # more rows than a streaming step: PyTorch's GEMM
        linear(x, torch.randn(96, 64).T)  # not contiguous
        linear(torch.randn(2, 36), torch.randn(8, 36))  # inner size not a multiple of 8
    w.requires_grad_(True)
    y = linear(x, w)  # autograd needs PyTorch's op
    y.sum().backward()
    assert calls == ["linear"] and w.grad is not None


def _run(cfg: TransformerConfig, dtype: torch.dtype, kernels_on: bool, monkeypatch, rows_schedule, steps: int) -> list:
    monkeypatch.setattr(cpu_kernels, "ENABLED", kernels_on)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype).eval()
    cache = model.init_state(3, max_step=steps)
    g = torch.Generator().manual_seed(1)
    outputs = []
    with torch.no_grad():
        for rows in rows_schedule:
            x = torch.randn(3 if rows is None else len(rows), steps, cfg.d_model, generator=g).to(dtype)
            outputs.append(model.step(x, cache, None if rows is None else torch.tensor(rows)))
    return outputs


# The LM's layers (RMSNorm, SiLU gate) and Mimi's (LayerNorm, GELU, layer scale).
LAYERS = {"lm": dict(norm="rms_norm_f32", gating="silu", layer_scale=None),
          "mimi": dict(norm="layer_norm", gating="none", layer_scale=0.01)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("position", ["rope", "none"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("layers", LAYERS)
def test_fused_attention_step_equals_the_pytorch_step(kernel, dtype, position, steps, layers, monkeypatch):
    """Over a wrapping ring, with streams stepped alone, in subsets and all together, one
    step per call (the LM) or two (Mimi's transformers)."""
    cfg = TransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, context=5,
                            positional_embedding=position, **LAYERS[layers])
    schedule = [None, [1], [0, 2], None, [2], [1, 0], None, None, [0], None]
    fused = _run(cfg, dtype, True, monkeypatch, schedule, steps)
    reference = _run(cfg, dtype, False, monkeypatch, schedule, steps)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_whole_stack_step_gives_the_bits_of_the_layer_by_layer_kernels(kernel, steps, monkeypatch):
    """Mimi's layers in one C++ call (`layers_step`) are the same kernels in the same order:
    the same bits, over a wrapping ring, with streams stepped in subsets, alone and in lockstep
    with an `active` mask."""
    cfg = TransformerConfig(d_model=64, num_heads=4, num_layers=3, dim_feedforward=128, context=5, **LAYERS["mimi"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    calls = []
    whole = kernel.layers_step
    monkeypatch.setattr(Transformer, "_layers_kernel", lambda self, x, cache, original=Transformer._layers_kernel:
                        None if self.layer_by_layer else original(self, x, cache))

    class Spy:
        def __getattr__(self, name):
            return getattr(kernel, name)

        def layers_step(self, *args):
            calls.append(args[0].shape)
            return whole(*args)

    monkeypatch.setattr(cpu_kernels, "kernels", lambda: Spy())
    caches = {flag: model.init_state(3, max_step=steps) for flag in (False, True)}
    g = torch.Generator().manual_seed(1)
    schedule = [None, [1], [0, 2], "active", None, [2], "active", None, [0], None]
    with torch.no_grad():
        for rows in schedule:
            x = torch.randn(3 if rows in (None, "active") else len(rows), steps, 64, generator=g)
            kwargs = ({"active": torch.tensor([True, False, True])} if rows == "active"
                      else {"rows": None if rows is None else torch.tensor(rows)})
            out = {}
            for flag, cache in caches.items():
                model.layer_by_layer = flag
                out[flag] = model.step(x, cache, **kwargs)
            assert torch.equal(out[False], out[True]), rows
            assert torch.equal(caches[False].keys[2], caches[True].keys[2])
    assert len(calls) == len(schedule)  # the whole-stack call ran at every step, and only there


def test_rows_step_only_their_streams(monkeypatch):
    """A subset step leaves the other rows' caches as they were, and gives each stepped row
    what stepping it alone gives."""
    cfg = TransformerConfig(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, context=4)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = torch.randn(3, 1, 32)
    with torch.no_grad():
        cache = model.init_state(3)
        model.step(x, cache)
        before = [k.clone() for k in cache.keys], cache.offset.clone()
        y = model.step(x[[2, 0]], cache, torch.tensor([2, 0]))
        assert torch.equal(cache.keys[0][1], before[0][0][1]) and cache.offset.tolist() == [2, 1, 2]
        for i, row in enumerate((2, 0)):
            alone = model.init_state(1)
            model.step(x[row : row + 1], alone)
            torch.testing.assert_close(y[i : i + 1], model.step(x[row : row + 1], alone), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_and_silu_gate(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 256, generator=g).to(dtype)
    alpha = (torch.rand(1, 1, 256, generator=g) + 0.5).to(dtype)
    y = x.double()
    exact = y * alpha.double() / torch.sqrt(1e-8 + y.pow(2).mean(-1, keepdim=True))
    rounding = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    got = kernel.rms_norm(x, alpha, 1e-8)
    assert got.dtype == dtype and (got.double() - exact).abs().max() <= rounding * exact.abs().max()
    gate_up = torch.randn(3, 1, 2 * 88, generator=g).to(dtype)
    got = kernel.silu_mul(gate_up)
    expected = F.silu(gate_up[..., :88]) * gate_up[..., 88:]  # PyTorch's two roundings
    torch.testing.assert_close(got, expected, rtol=rounding * 2, atol=rounding * 2)


def _ulps(got: torch.Tensor, exact: torch.Tensor, size: torch.Tensor | None = None) -> float:
    """The largest error of float32 `got`, in units of float32's epsilon times the size of
    what was summed (`size`, by default |exact|, at least a thousandth of its largest value)."""
    size = exact.abs() if size is None else size
    size = size.clamp_min(1e-3 * size.max())
    return float(((got.double() - exact).abs() / (torch.finfo(torch.float32).eps * size)).max())


def test_fused_layer_norm_gelu_and_scaled_residual(kernel):
    """Mimi's row operations against float64, for widths with and without a tail of 8."""
    g = torch.Generator().manual_seed(0)
    for dim in (512, 517):
        x = torch.randn(3, 2, dim, generator=g) * 3 + 1
        weight, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
        normed = F.layer_norm(x.double(), (dim,), eps=1e-5)
        exact, size = normed * weight + bias, (normed * weight).abs() + bias.abs()
        assert _ulps(kernel.layer_norm(x, weight, bias, 1e-5), exact, size) < 8
        update, scale = torch.randn(3, 2, dim, generator=g), torch.randn(dim, generator=g)
        exact, size = x.double() + scale * update.double(), x.abs() + (scale * update).abs()
        assert _ulps(kernel.add_scaled(x, update, scale), exact, size) <= 1
    x = torch.cat([torch.linspace(-10, 10, 20001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0])])
    for shape in ((20007,), (3, 2, 3334)):
        inputs = x[: torch.Size(shape).numel()].reshape(shape)
        got, exact = kernel.gelu(inputs).double(), F.gelu(inputs.double())
        # The erf approximation's absolute error (1.5e-7, as PyTorch's vectorized erf), times
        # |x| / 2, plus a few roundings.
        bound = 0.75e-7 * inputs.abs() + 4 * torch.finfo(torch.float32).eps * exact.abs()
        assert ((got - exact).abs() <= bound).all()
