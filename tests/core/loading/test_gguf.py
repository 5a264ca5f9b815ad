"""Kyutai's Candle q8 GGUF: our reader against the `gguf` package, and the LM it loads."""

import gguf
import pytest
import torch
from oracle import REDUCED_7B, official_state_dict, random_reference_lm, write_candle_gguf

from moshi_core.errors import CheckpointError
from moshi_core.kernels import build as cpu_kernels
from moshi_core.kernels import q8
from moshi_core.kernels.q8 import Q8Tensor, QuantizedWeight, TiledQ8Weight
from moshi_core.loading.checkpoints import load_lm
from moshi_core.loading.gguf import candle_to_ours, read_gguf
from moshi_core.models.lm import LMConfig

# dim 128 makes the temporal MLP (hidden 352) Q8_0; the depth MLP (hidden 88) stays F32,
# as Candle's rule leaves rows that are not whole blocks: both paths are exercised.
CONFIG = dict(REDUCED_7B, dim=128)


@pytest.fixture(autouse=True)
def strict_float_arithmetic(monkeypatch):
    """These tests prove the strict path (int8 weights, float activations) equal to the float
    model; the default int8 arithmetic has its own tests (tests/core/kernels/test_q8_int8.py)."""
    monkeypatch.setattr(q8, "INT8_ACTIVATIONS", False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    ref = random_reference_lm(CONFIG)
    path = write_candle_gguf(tmp_path_factory.mktemp("gguf") / "model.q8.gguf", official_state_dict(ref), 8)
    return path, ref


def test_dequantization_equals_the_gguf_package(files):
    path, _ = files
    ours = read_gguf(path)
    reader = gguf.GGUFReader(str(path))
    q8 = 0
    for t in reader.tensors:
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        mine = ours[t.name]
        if isinstance(mine, Q8Tensor):
            q8 += 1
            mine = mine.dequantize()
            assert mine.dtype == torch.float32
        assert torch.equal(mine.reshape(expected.shape), expected), t.name
    assert q8 > 90  # most matrices are Q8_0 (98 here; the depth MLP outputs stay F32)


def _codes(steps=8):
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randint(0, 100, (2, 1, steps), generator=g), torch.randint(0, 64, (2, 16, steps), generator=g)], 1)


def test_dequantized_lm_equals_the_reference_on_the_same_weights(files):
    """Loaded through the user's code path; the reference gets the weights as we dequantized them."""
    from moshi.models.lm import LMModel

    path, ref = files
    ours = load_lm(path, LMConfig.from_dict(CONFIG), dtype=torch.float32, dequantize=True)
    reference = LMModel(**CONFIG).eval()
    reference.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()})
    codes = _codes()
    with torch.no_grad():
        mine, theirs, original = ours(codes), reference(codes), ref(codes)
    valid = ~theirs.logits.isnan()
    torch.testing.assert_close(mine.logits[valid], theirs.logits[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.text_logits, theirs.text_logits, rtol=1e-5, atol=1e-5, equal_nan=True)
    # Q8_0 stays close to the unquantized model it came from.
    drift = (mine.logits[valid] - original.logits[valid]).abs().max()
    assert drift < 0.05 * original.logits[valid].abs().max()


@pytest.fixture(scope="module")
def int8_and_float(files):
    path, _ = files
    cfg = LMConfig.from_dict(CONFIG)
    return load_lm(path, cfg, dtype=torch.float32), load_lm(path, cfg, dtype=torch.float32, dequantize=True)


def test_int8_weights_stay_int8(int8_and_float):
    int8, _ = int8_and_float
    attention = int8.transformer.layers[0].self_attn
    for weight in (int8.text_linear.weight, int8.emb[0].weight, attention.in_proj_weight, int8.linears[3].weight):
        assert isinstance(weight, TiledQ8Weight) and weight.tiles.dtype == torch.int8  # the CPU's layout
    assert not isinstance(int8.out_norm.alpha, QuantizedWeight)


def test_int8_forward_within_1e4_of_float32_and_of_the_reference(int8_and_float):
    """Same weights, summed in another order: logits agree to 1e-4 (relative to their scale)
    with ours in float32 and with the reference run on the dequantized weights."""
    from moshi.models.lm import LMModel

    int8, floating = int8_and_float
    reference = LMModel(**CONFIG).eval()
    reference.load_state_dict({k: v.clone() for k, v in floating.state_dict().items()})
    codes = _codes()
    with torch.no_grad():
        a = int8(codes)
        for b in (floating(codes), reference(codes)):
            valid = ~b.logits.isnan()
            assert (a.logits[valid] - b.logits[valid]).abs().max() < 1e-4 * b.logits[valid].abs().max()
            text_scale = b.text_logits.nan_to_num().abs().max()
            assert (a.text_logits - b.text_logits).abs().nan_to_num().max() < 1e-4 * text_scale


def test_int8_greedy_generation_equals_float32_for_60_steps(int8_and_float):
    from moshi_core.inference.generate import LMGenerator
    from moshi_core.params import SamplingParams

    outputs = []
    user = torch.randint(0, 64, (60, 2, 8, 1), generator=torch.Generator().manual_seed(1))
    for model in int8_and_float:
        gen = LMGenerator(model, SamplingParams.greedy())
        state = gen.init_state(2)
        outputs.append(torch.stack([gen.step(user[t], state) for t in range(60)]))
    assert torch.equal(outputs[0], outputs[1])


def test_fallback_without_the_cpu_kernel_agrees(int8_and_float, monkeypatch):
    int8, _ = int8_and_float
    codes = _codes()
    with torch.no_grad():
        with_kernel = int8(codes).logits
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
        without = int8(codes).logits
    valid = ~with_kernel.isnan()
    torch.testing.assert_close(without[valid], with_kernel[valid], rtol=1e-4, atol=1e-4)


def test_shared_norm_copies_must_agree(files):
    path, _ = files
    tensors = read_gguf(path)
    name = "depformer.3.transformer.layers.0.norm1.alpha"
    tensors[name] = tensors[name] * 2
    with pytest.raises(CheckpointError, match="slices of depformer.layers.0.norm1.alpha differ"):
        candle_to_ours(tensors, 8, "x.gguf")


def test_missing_and_foreign_tensors_are_named(tmp_path, files):
    _, ref = files
    state = official_state_dict(ref)
    del state["text_linear.weight"]
    state["extra.weight"] = torch.zeros(4, 32)
    path = write_candle_gguf(tmp_path / "bad.gguf", state, 8)
    with pytest.raises(CheckpointError, match=r"missing: text_linear\.weight.*unexpected: extra\.weight"):
        load_lm(path, LMConfig.from_dict(CONFIG), dtype=torch.float32)


def test_unsupported_type_and_garbage(tmp_path):
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "q4.gguf"), "moshi")
    data = gguf.quants.quantize(np.random.randn(4, 64).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("x.weight", data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="Q4_0; only Q8_0, F16 and F32"):
        read_gguf(tmp_path / "q4.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all" * 4)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        read_gguf(tmp_path / "junk.gguf")


def test_pytorch_q8_layout_loads_int8_rows(tmp_path):
    """Kyutai's `*-pytorch-q8` files: int8 `weight` + float32 `weight_scb` (row absmax)."""
    from safetensors.torch import save_file

    from moshi_core.kernels.q8 import Int8RowWeight

    ref = random_reference_lm(CONFIG)
    state = {}
    for name, value in official_state_dict(ref).items():
        if value.dim() == 2 and "emb" not in name:  # bitsandbytes quantizes the linears only
            scb = value.abs().amax(dim=1).float()
            state[name] = torch.round(value / scb[:, None] * 127).to(torch.int8)
            state[name + "_scb"] = scb
        else:
            state[name] = value
    path = tmp_path / "model.q8.safetensors"
    save_file(state, str(path))
    cfg = LMConfig.from_dict(CONFIG)
    int8 = load_lm(path, cfg, dtype=torch.float32)
    floating = load_lm(path, cfg, dtype=torch.float32, dequantize=True)
    assert isinstance(int8.transformer.layers[1].gating.linear_in.weight, Int8RowWeight)
    assert not isinstance(int8.text_emb.weight, Int8RowWeight)
    codes = _codes()
    with torch.no_grad():
        a, b = int8(codes).logits, floating(codes).logits
    valid = ~b.isnan()
    assert (a[valid] - b[valid]).abs().max() < 1e-4 * b[valid].abs().max()
