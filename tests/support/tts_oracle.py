"""A tiny Kyutai TTS model with random weights, written as `kyutai/tts-1.6b-en_fr` lays it out.

The config is the released one with narrower layers: same streams (text +
32 audio codebooks, acoustic delay 2, audio 1.28 s behind the text), look-ahead text
stream, low-rank depth embeddings, 11 depth weight sets, the voice through cross-attention
and the `cfg`/`control` settings summed in. Voices are `speaker_wavs` files named as in
`kyutai/tts-voices`. Import the fixture `tiny_tts` into a test module to use it.
"""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from oracle import official_state_dict
from safetensors.torch import save_file

SIG, EPOCH = "1e68beda", 240
SUFFIX = f".{SIG}@{EPOCH}.safetensors"
VOICES = ("expresso/ex03-ex01_happy_001_channel1_334s.wav", "vctk/p225_023.wav")

TINY_TTS_CONFIG = {
    "card": 2048, "n_q": 32, "dep_q": 32, "delays": [0] + [0] + [2] * 31,
    "dim": 64, "text_card": 64, "existing_text_padding_id": 3, "num_heads": 4, "num_layers": 2,
    "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 500, "max_period": 10000,
    "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 32, "depformer_num_heads": 2, "depformer_num_layers": 2, "depformer_dim_feedforward": 96,
    "depformer_multi_linear": True, "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "depformer_low_rank_embeddings": 8, "demux_second_stream": True, "text_card_out": None,
    "conditioners": {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
        "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                                       "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]}},
        "control": {"type": "lut", "lut": {"dim": 64, "n_bins": 1, "tokenizer": "noop", "possible_values": ["ok"]}},
    },
    "fuser": {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1, "sum": ["control", "cfg"],
              "prepend": [], "cross": ["speaker_wavs"]},
    "cross_attention": True,
    "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
    "model_id": {"sig": SIG, "epoch": EPOCH},
    "depformer_weights_per_step_schedule": list(range(8)) + [8] * 8 + [9] * 8 + [10] * 8,
    "model_type": "tts",
    "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
    "tokenizer_name": "tokenizer_spm_test.model",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "moshi_name": f"dsm_tts_{SIG}@{EPOCH}.safetensors",
}
NOT_LM = ("tts_config", "model_id", "model_type", "lm_gen_config", "tokenizer_name", "mimi_name", "moshi_name")


def lm_kwargs(config: dict) -> dict:
    return copy.deepcopy({k: v for k, v in config.items() if k not in NOT_LM})


def random_reference_tts_lm(config: dict, seed: int = 0):
    """The reference LM with its conditioners, random weights (norms perturbed so they matter)."""
    from moshi.models import loaders

    torch.manual_seed(seed)
    model = loaders.get_moshi_lm(None, lm_kwargs(config), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha") or "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tts_state_dict(model) -> dict[str, torch.Tensor]:
    """Official names: fused self-attention (oracle) and fused cross-attention projections."""
    state = official_state_dict(model)
    out = {}
    for key, value in state.items():
        key = key.replace("cross_attention.in_projs.0.weight", "cross_attention.in_proj_weight")
        key = key.replace("cross_attention.out_projs.0.weight", "cross_attention.out_proj.weight")
        out[key] = value
    return out


def write_voice(path: Path, seed: int, frames: int = 125) -> Path:
    """A voice file as in kyutai/tts-voices: `speaker_wavs` [1, 512, frames], float32."""
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 512, frames, generator=generator) * 0.08
    save_file({"speaker_wavs": emb}, str(path), metadata={"epoch": str(EPOCH), "sig": SIG})
    return path


@pytest.fixture(scope="session")
def tiny_tts(tmp_path_factory: pytest.TempPathFactory, mimi_checkpoint: Path, tokenizer_model: Path) -> tuple[Path, Path]:
    """(model folder, voice folder) laid out like kyutai/tts-1.6b-en_fr and kyutai/tts-voices."""
    root = tmp_path_factory.mktemp("tiny-tts")
    folder, voices = root / "model", root / "voices"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_TTS_CONFIG, indent=2))
    save_file(tts_state_dict(random_reference_tts_lm(TINY_TTS_CONFIG)), str(folder / TINY_TTS_CONFIG["moshi_name"]))
    os.symlink(mimi_checkpoint, folder / TINY_TTS_CONFIG["mimi_name"])
    shutil.copy(tokenizer_model, folder / TINY_TTS_CONFIG["tokenizer_name"])
    for i, name in enumerate(VOICES):
        write_voice(voices / (name + SUFFIX), seed=100 + i)
    return folder, voices


def reference_tts(folder: Path, voices: Path, temp: float = 0.0, max_padding: int = 8):
    """Kyutai's TTSModel on our files, through its own loaders, in float32."""
    from moshi.models import loaders
    from moshi.models.tts import TTSModel

    raw = json.loads((folder / "config.json").read_text())
    info = loaders.CheckpointInfo(
        moshi_weights=folder / raw["moshi_name"], mimi_weights=folder / raw["mimi_name"],
        tokenizer=folder / raw["tokenizer_name"], lm_config=lm_kwargs(raw), raw_config=raw,
        model_type=raw["model_type"], lm_gen_config=raw["lm_gen_config"], tts_config=raw["tts_config"],
        model_id=raw["model_id"],
    )
    return TTSModel.from_checkpoint_info(info, voice_repo=str(voices), device="cpu", dtype=torch.float32, temp=temp,
                                         max_padding=max_padding)
