"""`quantize="q8"`: float checkpoints become GGUF Q8_0 as they load.

The conversion must give the bits llama.cpp and Candle would write, so a bf16 checkpoint
loaded with q8 is the same model as its `model.q8.gguf`; and it must read the checkpoint
tensor by tensor, never holding the float matrices all at once.
"""

import json
import math
import os
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from oracle import write_candle_gguf, write_q8_gguf, write_stt_folder
from safetensors.torch import load_file, save_file
from tts_oracle import VOICES, tiny_tts  # noqa: F401 (fixture)

from moshi_core.errors import InvalidParameterError
from moshi_core.kernels import build as cpu_kernels
from moshi_core.kernels.q8 import QuantizedWeight, TiledQ8Weight
from moshi_core.kernels.quantize import is_q8_matrix, quantize_q8_0
from moshi_core.loading import checkpoints
from moshi_core.loading.registry import load_moshi
from moshi_core.models.lm import LMConfig

# -- the conversion -----------------------------------------------------------------------------


def ggml_q8_0_block(block: list[float]) -> tuple[list[int], float]:
    """ggml's `quantize_row_q8_0_ref` for one block, written out in float64 arithmetic.

    Each of its float32 steps is one IEEE operation, computed exactly in float64 and then
    rounded to float32 (exact for a single +, *, /); roundf is floor(|v| + 0.5), which float64
    computes exactly for float32 values below 2^24."""
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    d = f32(max(abs(x) for x in block) / 127)
    inverse = f32(1 / d) if d else 0.0
    qs = [int(math.copysign(math.floor(abs(f32(x * inverse)) + 0.5), x)) for x in block]
    return qs, float(np.float16(d))


def _edge_blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5] * 4)
    ties[0] = 127.0  # amax 127: d = 1, id = 1, so x * id are exact halves
    blocks = [
        torch.zeros(32),  # all zero: d = 0, every q 0
        ties,
        torch.randn(32, generator=g).clamp(max=0.5) - 3,  # the largest magnitude is negative: -127
        torch.randn(32, generator=g) * 1e-6,  # d below float16's normal range (a subnormal scale)
        torch.randn(32, generator=g) * 40,
        torch.full((32,), -7.0),
    ]
    return torch.stack(blocks).reshape(3, 64)


@pytest.fixture(params=["kernel", "portable"])
def conversion(request, monkeypatch):
    """Each way the conversion runs: our CPU kernel (where it builds) and PyTorch's ops."""
    if request.param == "kernel" and cpu_kernels.kernels() is None:
        pytest.skip("no CPU kernels here")
    monkeypatch.setattr(cpu_kernels, "ENABLED", request.param == "kernel")
    return request.param


def test_q8_0_equals_ggml_rule_edge_cases_and_random(conversion):
    g = torch.Generator().manual_seed(1)
    weights = [_edge_blocks(), (torch.randn(300, 96, generator=g) * 0.03).bfloat16()]
    for weight in weights:
        original = weight.clone()
        q8 = quantize_q8_0(weight)
        assert torch.equal(weight, original)  # the slabs are converted in buffers of their own
        assert q8.qs.dtype == torch.int8 and q8.scales.dtype == torch.float16
        for row in range(weight.shape[0]):
            for b in range(weight.shape[1] // 32):
                block = weight[row, b * 32 : (b + 1) * 32].float().tolist()
                qs, scale = ggml_q8_0_block(block)
                assert q8.qs[row, b * 32 : (b + 1) * 32].tolist() == qs, (row, b)
                assert float(q8.scales[row, b]) == scale, (row, b)
    ties = quantize_q8_0(_edge_blocks()).qs[0, 32:64]
    assert ties[:8].tolist() == [127, -1, 2, -2, 3, -3, 127, -127]  # halves away from zero
    assert quantize_q8_0(_edge_blocks()).qs[1, :32].min() == -127


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_q8_0_equals_what_the_gguf_package_writes(conversion, dtype):
    """llama.cpp's own Python writer (`gguf.quants`, bit-exact with ggml by its own tests)."""
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(1000, 128, generator=g) * 0.02).to(dtype)
    raw = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    blocks = raw.reshape(1000, 4, 34)
    q8 = quantize_q8_0(weight)
    assert torch.equal(q8.scales, torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0]))
    assert torch.equal(q8.qs, torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(1000, 128))


def test_the_kernel_converts_as_the_portable_path_does(monkeypatch):
    if cpu_kernels.kernels() is None:
        pytest.skip("no CPU kernels here")
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(2053, 320, generator=g).bfloat16()[:, 32:]  # not contiguous, many rows per task
    kernel = quantize_q8_0(weight)
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    portable = quantize_q8_0(weight)
    assert torch.equal(kernel.qs, portable.qs) and torch.equal(kernel.scales, portable.scales)


def test_which_tensors_candle_would_quantize():
    assert is_q8_matrix(torch.zeros(5, 64, dtype=torch.bfloat16))
    for kept in (torch.zeros(64, 48), torch.zeros(1, 1, 64), torch.zeros(64), torch.zeros(4, 64, dtype=torch.int8)):
        assert not is_q8_matrix(kept)
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize_q8_0(torch.zeros(4, 48))


# -- through the user's path: a bf16 checkpoint with q8 is its GGUF -----------------------------


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As Kyutai ships them: bfloat16, the TTS conditioners float32."""
    return {k: v.bfloat16() if v.is_floating_point() and not k.startswith("condition_provider.") else v
            for k, v in state.items()}


def _pair(root: Path, folder: Path, write_gguf) -> tuple[Path, Path]:
    """(folder with a bf16 LM file, folder with `model.q8.gguf` from the same weights), both
    with the rest of `folder` (config, Mimi, tokenizer)."""
    config = json.loads((folder / "config.json").read_text())
    lm_name = config.get("moshi_name", "model.safetensors")
    state = _bf16(load_file(folder / lm_name))
    made = []
    for kind in ("bf16", "gguf"):
        out = root / kind
        out.mkdir()
        for item in folder.iterdir():
            if item.name not in (lm_name, "config.json"):
                os.symlink(item.resolve(), out / item.name)
        (out / "config.json").write_text(json.dumps(dict(config, moshi_name=lm_name if kind == "bf16" else
                                                         "model.q8.gguf")))
        made.append(out)
    save_file(state, str(made[0] / lm_name))
    write_gguf(made[1] / "model.q8.gguf", state)
    return made[0], made[1]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every parameter and buffer, 8-bit weights included (they are plain attributes)."""
    found: dict[str, torch.Tensor | QuantizedWeight] = dict(model.state_dict())
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, QuantizedWeight):
                found[f"{prefix}.{attr}"] = value
    return found


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> int:
    """Bit-equal weights, 8-bit where the other's are; returns how many are 8-bit."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    q8 = 0
    for name, x in wa.items():
        y = wb[name]
        assert type(x) is type(y), name
        if isinstance(x, TiledQ8Weight):
            q8 += 1
            assert x.rows == y.rows and torch.equal(x.tiles, y.tiles) and torch.equal(x.scales, y.scales), name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    return q8


def _codes(model, steps: int = 6) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, cfg.text_card, (2, 1, steps), generator=g)
    return torch.cat([text, torch.randint(0, cfg.card, (2, cfg.n_q, steps), generator=g)], dim=1)


def assert_same_logits(a, b) -> None:
    codes = _codes(a)
    with torch.no_grad():
        if a.cfg.dep_q == 0:  # speech to text: the temporal transformer's hidden state and text logits
            x, y = (lm.forward_text(codes, lm.init_state(2, max_step=codes.shape[-1])) for lm in (a, b))
        else:
            x, y = a(codes)[::2], b(codes)[::2]  # audio and text logits
    for u, v in zip(x, y):
        assert u.isfinite().any() and torch.equal(u.nan_to_num(), v.nan_to_num())


def load_gguf_lm(folder: Path):
    """The LM of `folder`'s `model.q8.gguf`, without loading its Mimi again."""
    config = LMConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return checkpoints.load_lm(folder / "model.q8.gguf", config)


@pytest.fixture(scope="module")
def moshi_pair(tiny_moshi, tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("q8-moshi"), tiny_moshi, lambda path, state: write_candle_gguf(path, state, 8))


def test_moshi_q8_from_bf16_is_its_gguf(moshi_pair):
    from moshi_core.inference.generate import LMGenerator
    from moshi_core.params import SamplingParams

    bf16, gguf_folder = moshi_pair
    quantized, from_gguf = load_moshi(bf16, quantize="q8").lm, load_gguf_lm(gguf_folder)
    assert assert_same_weights(quantized, from_gguf) > 50
    # Rows of 176 (the temporal MLP's output) are not whole blocks: float, as in the GGUF.
    mlp_out = quantized.transformer.layers[0].gating.linear_out.weight
    assert not isinstance(mlp_out, QuantizedWeight) and mlp_out.dtype == torch.bfloat16
    assert isinstance(quantized.text_emb.weight, TiledQ8Weight) and isinstance(quantized.linears[0].weight, TiledQ8Weight)
    assert_same_logits(quantized, from_gguf)
    user = torch.randint(0, 2048, (8, 2, 8, 1), generator=torch.Generator().manual_seed(4))
    tokens = []
    for lm in (quantized, from_gguf):
        gen = LMGenerator(lm, SamplingParams.greedy())
        state = gen.init_state(2)
        tokens.append(torch.stack([gen.step(user[t], state) for t in range(8)]))
    assert torch.equal(tokens[0], tokens[1])
    # An 8-bit checkpoint is left as it is.
    config = LMConfig.from_dict(json.loads((gguf_folder / "config.json").read_text()))
    assert assert_same_weights(checkpoints.load_lm(gguf_folder / "model.q8.gguf", config, quantize="q8"), from_gguf)


@pytest.mark.slow
def test_stt_q8_from_bf16_is_its_gguf(tmp_path, mimi_checkpoint, tokenizer_model):
    from moshi_core.inference.stt import load_stt

    write_stt_folder(tmp_path / "stt", "stt-1b-en_fr", mimi_checkpoint, tokenizer_model)
    bf16, gguf_folder = _pair(tmp_path, tmp_path / "stt", lambda path, state: write_candle_gguf(path, state, 0))
    quantized, from_gguf = load_stt(str(bf16), quantize="q8").lm, load_gguf_lm(gguf_folder)
    assert assert_same_weights(quantized, from_gguf) > 10
    assert isinstance(quantized.extra_heads[0].weight, TiledQ8Weight)
    assert_same_logits(quantized, from_gguf)


@pytest.mark.slow
def test_tts_q8_from_bf16_is_its_gguf(tiny_tts, tmp_path):  # noqa: F811
    import dataclasses

    from moshi_core.inference.tts import TTSRequest, TTSSession, load_tts
    from moshi_core.params import TTSParams

    folder, voices = tiny_tts
    # No Candle TTS GGUF exists: this one keeps our names, and its conditioners float32 as we do.
    bf16, gguf_folder = _pair(tmp_path, folder, lambda path, state: write_q8_gguf(
        path, state, keep_float=("condition_provider.",)))
    quantized = load_tts(bf16, voices=voices, quantize="q8")
    from_gguf = dataclasses.replace(quantized, lm=load_gguf_lm(gguf_folder))
    assert assert_same_weights(quantized.lm, from_gguf.lm) > 50
    assert quantized.lm.condition_provider.conditioners["speaker_wavs"].output_proj.weight.dtype == torch.float32
    frames = []
    params = TTSParams(temp=0.0, max_padding=2, max_steps=quantized.delay_steps + 6)  # 6 frames of audio
    for model in (quantized, from_gguf):
        session = TTSSession(model, [TTSRequest("hello there", VOICES[0], params)])
        pcm = torch.cat([chunk.pcm for chunk in session.stream()])
        frames.append((torch.stack(session.frames, dim=-1), pcm))
    assert frames[0][1].numel() >= 1920
    assert torch.equal(frames[0][0], frames[1][0]) and torch.equal(frames[0][1], frames[1][1])


# -- memory: one float matrix at a time -------------------------------------------------------------


def test_q8_load_holds_at_most_one_float_matrix_at_a_time(moshi_pair, monkeypatch):
    """Every matrix the reader hands out must be gone (quantized, dropped) before the next is read."""
    real_open = checkpoints.safe_open
    matrices: list[weakref.ref] = []
    alive_at_read: list[int] = []

    class CountingFile:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, name):
            tensor = self.file.get_tensor(name)
            if is_q8_matrix(tensor):
                alive_at_read.append(sum(ref() is not None for ref in matrices))
                matrices.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(checkpoints, "safe_open", CountingFile)
    bf16, _ = moshi_pair
    config = LMConfig.from_dict(json.loads((bf16 / "config.json").read_text()))
    lm = checkpoints.load_lm(bf16 / "model.safetensors", config, quantize="q8")
    q8 = sum(isinstance(w, TiledQ8Weight) for w in weights(lm).values())
    assert len(matrices) == q8 > 50  # each came through the reader, once (the depformer's norms are 3-D)
    assert max(alive_at_read) == 0 and all(ref() is None for ref in matrices)


# -- settings and command line ----------------------------------------------------------------------


def test_a_bad_quantize_value_is_one_clear_line(capsys):
    from moshi_core.cli.main import build_parser
    from workers.errors import SettingsError
    from workers.settings import Settings

    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"MOSHI_QUANTIZE": "int4"})
    assert str(caught.value) == "MOSHI_QUANTIZE='int4' is not valid: use none or q8"
    assert Settings.from_env({"MOSHI_QUANTIZE": "q8"}).quantize == "q8"
    assert Settings.from_env({}).quantize == "none"
    with pytest.raises(InvalidParameterError, match="quantize must be one of none, q8, not 'int4'"):
        load_moshi("kyutai/not-fetched", quantize="int4")  # before any download
    parser = build_parser()
    for command in (["dialogue", "in.wav", "-o", "out.wav"], ["transcribe", "in.wav"], ["tts", "hi", "-o", "o.wav"]):
        assert parser.parse_args([*command, "--quantize", "q8"]).quantize == "q8"
        assert parser.parse_args(command).quantize == "none"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["dialogue", "in.wav", "-o", "out.wav", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--quantize: invalid choice: 'int4'" in err and "q8" in err.splitlines()[-1]


def test_the_app_and_the_workers_pass_the_setting_down(monkeypatch):
    import app
    from workers import models
    from workers.settings import Settings

    assert app.build_parser(Settings(quantize="q8")).parse_args([]).quantize == "q8"
    asked = {}
    for loader in ("load_moshi", "load_stt", "load_tts"):
        monkeypatch.setattr(models, loader, lambda *args, _name=loader, **kwargs: asked.setdefault(_name, kwargs))
    cache = models.ModelCache(Settings(device="cpu", quantize="q8"))
    cache.moshi(cache.settings.default_model), cache.stt(), cache.tts()
    assert {name: kwargs["quantize"] for name, kwargs in asked.items()} == dict.fromkeys(asked, "q8")
    assert len(asked) == 3
