"""The 8-bit products as torch custom ops (`moshi::q8_tiles_linear`, `moshi::q8_linear`,
`moshi::int8_rows_linear`): opcheck on the CPU (C++ kernel and portable path), the same numbers
as the kernels they wrap, one graph without breaks under torch.compile, the CPU tile layout,
and the load-time choices (tiles on CPUs, `set_gpu_q8`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moshi_core.kernels import build, q8
from moshi_core.kernels.quantize import quantize_q8_0


@pytest.fixture(params=[True, False], ids=["cpu-kernel", "portable"])
def kernels_on(request):
    if request.param and not build.supported():
        pytest.skip("this CPU has no AVX2/FMA/F16C: the kernels are not built here")
    previous = build.ENABLED
    build.set_enabled(request.param)
    yield request.param
    build.set_enabled(previous)


def _q8(n: int, k: int) -> q8.Q8Tensor:
    return quantize_q8_0(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))


def _q8_weight(n: int, k: int) -> q8.Q8Weight:
    """Row-major: CUDA's layout."""
    w = _q8(n, k)
    return q8.Q8Weight(w.qs, w.scales, dtype=torch.float32)


def _tiled_weight(n: int, k: int) -> q8.TiledQ8Weight:
    """In tiles: the CPU's layout."""
    w = q8.Q8Tiles.of(_q8(n, k))
    return q8.TiledQ8Weight(w.tiles, w.scales, w.rows, dtype=torch.float32)


def _rows_weight(n: int, k: int) -> q8.Int8RowWeight:
    g = torch.Generator().manual_seed(n * k)
    cb = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return q8.Int8RowWeight(cb, torch.rand(n, generator=g) * 2, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8_activations", [True, False])
def test_q8_tiles_op_passes_opcheck(kernels_on, dtype, int8_activations):
    w = _tiled_weight(40, 96)
    for rows in (1, 5):
        x = torch.randn(rows, 96).to(dtype)
        torch.library.opcheck(q8.q8_tiles_linear, (x, w.tiles, w.scales, w.rows, int8_activations))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_major_q8_op_passes_opcheck(dtype):
    w = _q8_weight(40, 96)
    torch.library.opcheck(q8.q8_linear, (torch.randn(3, 96).to(dtype), w.qs, w.scales))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_op_passes_opcheck(dtype):
    w = _rows_weight(40, 37)
    torch.library.opcheck(q8.int8_rows_linear, (torch.randn(3, 37).to(dtype), w.cb, w.scb))


@pytest.mark.parametrize("int8_activations", [True, False])
def test_q8_weight_gives_the_kernels_numbers(kernels_on, int8_activations):
    """Through the op, exactly what the C++ kernel gives when called directly (or the dequantized product)."""
    w = _tiled_weight(2100, 64)  # more than one slab of 64 tiles
    x = torch.randn(3, 64).bfloat16()
    previous = q8.INT8_ACTIVATIONS
    q8.set_int8_activations(int8_activations)
    try:
        y = F.linear(x, w)
    finally:
        q8.set_int8_activations(previous)
    assert y.dtype == torch.bfloat16
    if kernels_on:
        assert torch.equal(y, build.kernels().q8_tiles_linear(x, w.tiles, w.scales, w.rows, int8_activations))
    else:  # the float product of the dequantized weights, summed in slabs: to a bfloat16 ulp
        torch.testing.assert_close(y, F.linear(x.float(), w.dequantize()).bfloat16(), rtol=2**-7, atol=1e-5)


def test_row_major_q8_weight_off_cuda_is_the_dequantized_product():
    w = _q8_weight(2100, 64)
    x = torch.randn(3, 64).bfloat16()
    torch.testing.assert_close(F.linear(x, w), F.linear(x.float(), w.dequantize()).bfloat16(), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("rows", [7, 16, 300])
def test_tiles_hold_the_matrix(rows):
    """The layout round-trips, embedding rows are the matrix's rows, and row slices at whole
    tiles (as the depth transformer's per-step weights and attention's projections are cut)
    are the slices of the matrix."""
    w = _q8(rows, 96)
    tiled = q8.TiledQ8Weight(*vars(q8.Q8Tiles.of(w)).values(), dtype=torch.float32)
    assert tiled.shape == (rows, 96) and tiled.tiles.shape == (-(-rows // 16), 3, 512)
    back = tiled.untiled()
    assert torch.equal(back.qs, w.qs) and torch.equal(back.scales, w.scales)
    tokens = torch.tensor([[0, rows - 1], [rows // 2, 5]])
    assert torch.equal(F.embedding(tokens, tiled), w.dequantize()[tokens])
    if rows > 16:
        x = torch.randn(2, 96)
        part = tiled[16:rows]
        assert part.shape == (rows - 16, 96)
        assert torch.equal(part.dequantize(), w.dequantize()[16:])
        assert torch.equal(F.linear(x, part), F.linear(x, tiled)[:, 16:])
    cut = tiled[1:3]  # inside a tile: a copy
    assert torch.equal(cut.dequantize(), w.dequantize()[1:3])
    with pytest.raises(TypeError, match="range of rows"):
        tiled[::2]


def test_int8_rows_weight_gives_pytorchs_numbers():
    w = _rows_weight(30, 37)
    x = torch.randn(4, 37).bfloat16()
    expected = torch._weight_int8pack_mm(x.float(), w.cb, w.scb / 127).bfloat16()
    assert torch.equal(F.linear(x, w), expected)


# aot_eager traces the ops through their fakes; inductor adds its code generation (a C++ build: slow).
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_step_has_one_graph_and_the_eager_numbers(kernels_on, backend):
    """8-bit products and embeddings trace as ops: no graph break, no host sync, same output."""
    table, proj, rows = _tiled_weight(50, 64), _tiled_weight(70, 64), _rows_weight(64, 70)
    bias = torch.randn(70)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens, table)
        return F.linear(torch.relu(F.linear(h, proj, bias)), rows)

    tokens = torch.tensor([[3, 17], [49, 0]])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(tokens)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(tokens), step(tokens), rtol=0, atol=0)
    torch._dynamo.reset()


def test_gpu_q8_mode_is_checked_and_cpus_keep_int8_in_tiles():
    with pytest.raises(ValueError, match="'int8' or 'dequantize'"):
        q8.set_gpu_q8("bf16")
    q8.set_gpu_q8("dequantize")
    try:
        model, state = _attached("cpu")
    finally:
        q8.set_gpu_q8("int8")
    assert isinstance(model[0].weight, q8.TiledQ8Weight)
    assert torch.equal(model[0].weight.dequantize(), state["0.weight"].dequantize())


def test_dequantize_mode_holds_float_weights_where_there_is_room(monkeypatch):
    """The load-time mechanics of "dequantize", on the CPU with the CUDA decision forced: float
    weights where the room check says yes (and they survive `to_empty` and a strict load), int8 where not."""
    monkeypatch.setattr(q8, "_dequantizes", lambda shape, dtype, device: shape[0] == 96)
    model, state = _attached("cpu")
    assert isinstance(model[1].weight, q8.TiledQ8Weight)
    float_weight = model[0].weight
    assert type(float_weight) is torch.Tensor and float_weight.dtype == torch.bfloat16
    assert torch.equal(float_weight, state["0.weight"].dequantize(torch.bfloat16))
    assert model(torch.randn(2, 64).bfloat16()).shape == (2, 40)


def test_room_keeps_the_reserve(monkeypatch):
    total = 1000 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (400 * 2**20, total))
    fits = 100 * 2**20 // 2  # 100 MiB of bfloat16: 300 MiB left, over the 250 MiB reserve
    assert q8._has_room(torch.Size([fits, 1]), torch.bfloat16, "cuda")
    assert not q8._has_room(torch.Size([2 * fits, 1]), torch.bfloat16, "cuda")


def _attached(device: str) -> tuple[nn.Module, dict]:
    """A two-layer model loaded from a Q8_0 state through `attach_int8_weights`, as `materialize` does."""
    g = torch.Generator().manual_seed(0)
    state = {"0.weight": quantize_q8_0(torch.randn(96, 64, generator=g)), "0.bias": torch.randn(96, generator=g),
             "1.weight": quantize_q8_0(torch.randn(40, 96, generator=g)), "1.bias": torch.randn(40, generator=g)}
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 40))
    rest = q8.attach_int8_weights(model, state, torch.bfloat16, device)
    model = model.to_empty(device=device).to(torch.bfloat16)
    model.load_state_dict(rest, strict=True)
    return model, state
