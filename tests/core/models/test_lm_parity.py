"""Our Moshi LM against the reference's `LMModel`: keys, teacher-forced logits, masks."""

from pathlib import Path

import pytest
import torch
from oracle import REDUCED_7B, TINY_TEST_LM, write_reference_lm

from moshi_core.loading.checkpoints import load_lm
from moshi_core.models.lm import MOSHI_7B, LMConfig, LMModel

CONFIGS = {"tiny-test": TINY_TEST_LM, "reduced-7b": REDUCED_7B}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs = CONFIGS[request.param]
    path = tmp_path_factory.mktemp("lm") / "model.safetensors"
    ref = write_reference_lm(path, kwargs)
    ours = load_lm(path, LMConfig.from_dict(kwargs), dtype=torch.float32)
    return ours, ref, kwargs


def _codes(kwargs, B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, kwargs["text_card"], (B, 1, T), generator=g)
    audio = torch.randint(0, kwargs["card"], (B, kwargs["n_q"], T), generator=g)
    codes = torch.cat([text, audio], dim=1)
    codes[0, 2, 3] = -1  # a "no input" token
    return codes


def test_teacher_forced_forward_matches_reference(pair):
    ours, ref, kwargs = pair
    codes = _codes(kwargs)
    with torch.no_grad():
        got, expected = ours(codes), ref(codes)
    assert torch.equal(got.mask, expected.mask) and torch.equal(got.text_mask, expected.text_mask)
    assert not got.mask.all()  # delays really leave invalid positions
    for mine, theirs in ((got.logits, expected.logits), (got.text_logits, expected.text_logits)):
        assert mine.shape == theirs.shape
        assert torch.equal(mine.isnan(), theirs.isnan())
        valid = ~theirs.isnan()
        torch.testing.assert_close(mine[valid], theirs[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_in_half_precision(pair, dtype, tmp_path):
    ours, _, kwargs = pair
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    from oracle import official_state_dict

    save_file({k: v.to(torch.bfloat16) for k, v in official_state_dict(pair[1]).items()}, str(path))
    half = load_lm(path, LMConfig.from_dict(kwargs), dtype=dtype)
    assert half.text_emb.weight.dtype == dtype
    with torch.no_grad():
        out = half(_codes(kwargs))
    valid = out.mask
    assert torch.isfinite(out.logits[valid.unsqueeze(-1).expand_as(out.logits)]).all()


def test_full_7b_has_exactly_the_official_tensors():
    """Built on the meta device: 355 tensors, 7,687,729,152 parameters, as Kyutai's files."""
    from moshi.models import loaders
    from moshi.models.lm import LMModel as Reference
    from oracle import official_state_dict

    with torch.device("meta"):
        ours = LMModel(LMConfig.from_dict(MOSHI_7B))
        ref_kwargs = dict(loaders._lm_kwargs)
        ref = Reference(**ref_kwargs)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in official_state_dict(ref).items()}
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == 355
    assert sum(v.numel() for v in ours.state_dict().values()) == 7_687_729_152
    assert MOSHI_7B == {k: v for k, v in loaders._lm_kwargs.items()}


def test_config_keys_are_checked():
    with pytest.raises(ValueError, match="unknown LM config keys: dimm"):
        LMConfig.from_dict(dict(REDUCED_7B, dimm=3))
    with pytest.raises(ValueError, match="delays"):
        LMConfig.from_dict(dict(REDUCED_7B, delays=[0, 1]))


def test_reference_test_assets_load_and_give_the_recorded_outputs():
    """Kyutai's own test model file (`moshi/tests/assets`, from the moshi sdist) through our
    loader: the logits and masks it recorded for its codes."""
    from safetensors.torch import load_file

    assets = Path(__file__).resolve().parents[3] / ".cache" / "reference" / "tests" / "assets"
    if not assets.is_dir():
        pytest.fail(f"{assets} is missing: `make setup-test` unpacks the reference sdist there")
    ours = load_lm(assets / "test_lm_model.safetensors", LMConfig.from_dict(TINY_TEST_LM), dtype=torch.float32)
    codes = load_file(str(assets / "test_lm_codes.safetensors"))["codes"]
    recorded = load_file(str(assets / "test_lm_out.safetensors"))
    with torch.no_grad():
        out = ours(codes)
    assert torch.equal(out.mask, recorded["mask"]) and torch.equal(out.text_mask, recorded["text_mask"])
    for mine, theirs in ((out.logits, recorded["logits"]), (out.text_logits, recorded["text_logits"])):
        valid = ~theirs.isnan()
        assert torch.equal(mine.isnan(), ~valid)
        torch.testing.assert_close(mine[valid], theirs[valid], rtol=1e-5, atol=1e-5)
