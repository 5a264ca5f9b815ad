"""Kyutai's reference implementation (`moshi==0.2.13`) as a test oracle.

It is installed with `--no-deps` in the test environment only. These helpers build it with
seeded random weights and write them in the official checkpoint format, so our loader reads
the same kind of file a user downloads.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file


def official_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors under the names Kyutai's released files use.

    The reference module splits each fused attention projection into one Linear per weight
    set (`in_projs.{i}`, `out_projs.{i}`); the files store them fused, concatenated along
    the output dimension, as `in_proj_weight` and `out_proj.weight`.
    """
    state: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in module.state_dict().items():
        value = value.detach().contiguous().clone()
        for split, joined in (("self_attn.in_projs.", "self_attn.in_proj_weight"),
                              ("self_attn.out_projs.", "self_attn.out_proj.weight")):
            if split in key:
                prefix, rest = key.split(split)
                fused.setdefault(prefix + joined, []).append((int(rest.split(".")[0]), value))
                break
        else:
            state[key] = value
    for key, parts in fused.items():
        state[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    return state


def _reference_latent(ref, wav: torch.Tensor) -> torch.Tensor:
    """The reference's latent [1, D, F] of `wav`, as its RVQ receives it."""
    with torch.no_grad():
        return ref.downsample(ref.encoder_transformer(ref.encoder(wav))[0])


def random_reference_mimi(calibration: torch.Tensor, seed: int = 0):
    """The reference Mimi at the full official config, with every tensor random.

    Default init leaves the codebooks empty and the layer scales at 0.01. The layer scales
    are drawn larger so every transformer layer matters, and the codebooks are drawn around
    the statistics of the latents of `calibration` audio [1, 1, T], so that real speech
    spreads over many codes at every level instead of picking one centroid forever.
    """
    from moshi.models import loaders

    torch.manual_seed(seed)
    model = loaders.get_mimi(None, device="cpu").eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.4 + 0.1)
        wav = calibration[..., : calibration.shape[-1] // 1920 * 1920]
        latent = _reference_latent(model, wav)
        for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            z = rvq.input_proj(latent)[0].T  # [frames, dim]
            mean, std = z.mean(0), z.std(0)
            for level, layer in enumerate(rvq.vq.layers):
                book = layer._codebook
                counts = torch.rand(book.cluster_usage.shape, generator=generator) * 2 + 0.5
                centre, spread = (mean, std) if level == 0 else (torch.zeros_like(mean), std / (level + 1))
                noise = torch.randn(book.embedding_sum.shape, generator=generator)
                book.cluster_usage.copy_(counts)
                book.embedding_sum.copy_((centre + spread * noise) * counts[:, None])
                book._initialized.fill_(1.0)
    return model


def write_reference_mimi(path: Path, calibration: torch.Tensor, seed: int = 0) -> Path:
    save_file(official_state_dict(random_reference_mimi(calibration, seed)), str(path))
    return path


def load_reference_mimi(path: Path, num_codebooks: int = 8):
    """The reference's own loader on our file: proves the file is in the official format."""
    from moshi.models import loaders

    model = loaders.get_mimi(str(path), device="cpu").eval()
    model.set_num_codebooks(num_codebooks)
    return model


def _reference_residual(ref, latent: torch.Tensor, frame: int, level: int,
                        codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual before `level`, centroids of `level`) in the reference's RVQ, for one frame of `latent`."""
    with torch.no_grad():
        latent = latent[..., frame : frame + 1]
        split = ref.quantizer
        rvq, first = (split.rvq_first, 0) if level == 0 else (split.rvq_rest, 1)
        residual = rvq.input_proj(latent)[0, :, 0]
        layers = rvq.vq.layers
        for lower in range(first, level):
            residual = residual - layers[lower - first]._codebook.embedding[codes[lower]]
        return residual, layers[level - first]._codebook.embedding


def assert_codes_equal_up_to_ties(codes: torch.Tensor, ref_codes: torch.Tensor, ref, wav: torch.Tensor,
                                  rel_gap: float = 1e-4, max_fraction: float = 0.01) -> None:
    """Codes [1, K, F] equal the reference's, except at exact nearest-centroid ties.

    With random codebooks about one decision in a few thousand has its two nearest
    centroids at the same distance to within float32 rounding; there, any change in the
    order of a sum (the reference's own streaming vs offline included) may pick the other.
    Each frame that differs must start differing at such a tie: the two codes' distances in
    the reference differ by less than `rel_gap`, relatively.
    """
    assert codes.shape == ref_codes.shape
    frames = (codes != ref_codes).any(dim=1)[0].nonzero().flatten().tolist()
    assert len(frames) <= max(1, max_fraction * codes.shape[-1]), f"{len(frames)} frames differ: {frames}"
    # One encoder pass for every differing frame: on a long file each pass takes seconds.
    latent = _reference_latent(ref, wav[..., : ref_codes.shape[-1] * 1920]) if frames else None
    for frame in frames:
        level = int((codes[0, :, frame] != ref_codes[0, :, frame]).nonzero()[0])
        residual, centroids = _reference_residual(ref, latent, frame, level, ref_codes[0, :, frame])
        ours, theirs = codes[0, level, frame], ref_codes[0, level, frame]
        d_ours = (residual - centroids[ours]).pow(2).sum()
        d_theirs = (residual - centroids[theirs]).pow(2).sum()
        gap = float((d_ours - d_theirs).abs() / d_theirs)
        assert gap < rel_gap, f"frame {frame} level {level}: codes {ours} vs {theirs} are not a tie (gap {gap:.2e})"


# The reference's own tiny test LM (`moshi/tests/test_lm.py`), as LMModel keyword arguments.
TINY_TEST_LM = dict(
    delays=[0, 1, 2, 4], n_q=3, dep_q=3, card=32, text_card=48, dim=16, num_layers=2, num_heads=1,
    hidden_scale=1, depformer_dim=16, depformer_multi_linear=True, depformer_weights_per_step=True,
    depformer_weights_per_step_schedule=[0, 1, 1], depformer_low_rank_embeddings=8, depformer_num_heads=1,
    depformer_gating="silu", context=4,
)

# Moshi 7B's structure (17 streams, delays, RMSNorm, SiLU gating, RoPE, per-codebook depformer
# weights) at a size a CI machine runs in milliseconds.
REDUCED_7B = dict(
    dim=64, text_card=100, existing_text_padding_id=3, n_q=16, dep_q=8, card=64, num_heads=4, num_layers=2,
    hidden_scale=4.125, causal=True, layer_scale=None, context=12, max_period=10000, gating="silu",
    norm="rms_norm_f32", positional_embedding="rope", depformer_dim=32, depformer_dim_feedforward=132,
    depformer_num_heads=2, depformer_num_layers=2, depformer_layer_scale=None, depformer_multi_linear=True,
    depformer_context=8, depformer_max_period=10000, depformer_gating="silu", depformer_pos_emb="none",
    depformer_weights_per_step=True, delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
)


def random_reference_lm(kwargs: dict, seed: int = 0):
    """The reference LMModel with its own random init; norms perturbed so they matter."""
    from moshi.models.lm import LMModel

    torch.manual_seed(seed)
    model = LMModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha") or "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_reference_lm(path: Path, kwargs: dict, seed: int = 0):
    model = random_reference_lm(kwargs, seed)
    save_file(official_state_dict(model), str(path))
    return model


def candle_state_dict(official: dict[str, torch.Tensor], dep_q: int) -> dict[str, torch.Tensor]:
    """PyTorch checkpoint names -> Candle's: the depth transformer split into
    one slice per codebook, its shared norms copied into every slice."""
    out: dict[str, torch.Tensor] = {}
    for name, value in official.items():
        if name.startswith("depformer_in."):
            out[f"depformer.{name.split('.')[1]}.linear_in.weight"] = value
        elif name.startswith("linears."):
            out[f"depformer.{name.split('.')[1]}.linear_out.weight"] = value
        elif name == "depformer_text_emb.weight":
            out["depformer.0.emb.weight"] = value
        elif name.startswith("depformer_emb."):
            out[f"depformer.{int(name.split('.')[1]) + 1}.emb.weight"] = value
        elif name.startswith("depformer.layers."):
            layer, rest = name.removeprefix("depformer.layers.").split(".", 1)
            if rest.startswith("gating."):
                slot, tail = rest.removeprefix("gating.").split(".", 1)
                out[f"depformer.{slot}.transformer.layers.{layer}.gating.{tail}"] = value
            elif rest.startswith("self_attn."):
                for s, chunk in enumerate(value.chunk(dep_q, dim=0)):
                    out[f"depformer.{s}.transformer.layers.{layer}.{rest}"] = chunk
            else:  # norms
                for s in range(dep_q):
                    out[f"depformer.{s}.transformer.layers.{layer}.{rest}"] = value
        else:
            out[name] = value
    return out


def write_candle_gguf(path: Path, official: dict[str, torch.Tensor], dep_q: int) -> Path:
    """A GGUF of the checkpoint under Candle's names, as Candle's tensor-tools quantizes it."""
    return write_q8_gguf(path, candle_state_dict(official, dep_q))


def write_q8_gguf(path: Path, tensors: dict[str, torch.Tensor], keep_float: tuple[str, ...] = ()) -> Path:
    """A GGUF as Candle's `tensor-tools quantize --quantization q8_0` writes it: 2-D tensors
    whose last dimension is a multiple of 32 in Q8_0 (with the `gguf` package, llama.cpp's
    own rule), everything else, and the names starting with `keep_float`, in F32."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "moshi")
    for name, value in sorted(tensors.items()):
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0 and not name.startswith(keep_float):
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TEST_SENTENCES = (
    "hello how are you doing today",
    "i am fine thank you very much",
    "what is the weather like in paris",
    "bonjour comment allez vous",
)


def write_test_tokenizer(path: Path) -> Path:
    """A small SentencePiece model (64 pieces) with Moshi's special ids (unk 0, eos 2, pad 3)."""
    import sentencepiece

    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(TEST_SENTENCES * 20), model_writer=f, vocab_size=64, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
        )
    return path


# The HF configs of kyutai/stt-1b-en_fr and kyutai/stt-2.6b-en, scaled down to 2 layers of width 256 (heads, context,
# RoPE period, norms, gating and heads as released), with our test tokenizer's 64 pieces.
STT_BASE = dict(
    card=2048, n_q=32, dep_q=0, delays=[0] * 33, dim=256, text_card=64, existing_text_padding_id=3,
    hidden_scale=4.125, causal=True, layer_scale=None, max_period=100000.0, gating="silu", norm="rms_norm_f32",
    positional_embedding="rope", depformer_dim=1024, depformer_num_heads=16, depformer_num_layers=6,
    depformer_dim_feedforward=None, depformer_multi_linear=True, depformer_pos_emb="none",
    depformer_weights_per_step=True, num_layers=2,
)
STT_CONFIGS = {
    # The candle repo's config: the 1B with its 4 voice-activity heads.
    "stt-1b-en_fr": dict(STT_BASE, num_heads=16, context=750, extra_heads_num_heads=4, extra_heads_dim=6),
    "stt-2.6b-en": dict(STT_BASE, num_heads=32, context=375),
}
STT_EXTRA = {
    "stt-1b-en_fr": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
    "stt-2.6b-en": {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0},
}


def write_stt_folder(folder: Path, name: str, mimi_checkpoint: Path, tokenizer_model: Path, **overrides):
    """A folder laid out like `kyutai/<name>` (STT_CONFIGS, changed by `overrides`); returns the
    reference LMModel of its weights."""
    import json
    import os
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    lm_kwargs = dict(STT_CONFIGS[name], **overrides)
    config = dict(lm_kwargs, conditioners={}, cross_attention=False, model_id={"sig": "0123abcd", "epoch": 100},
                  lm_gen_config={"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
                  stt_config=STT_EXTRA[name], model_type="stt", mimi_name="mimi-pytorch-e351c8d8@125.safetensors",
                  tokenizer_name="tokenizer_en_fr_audio_8000.model")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    reference = random_reference_lm(lm_kwargs, seed=1)
    with torch.no_grad():
        # A larger end-of-padding row makes random weights write word boundaries now and then.
        reference.text_linear.weight[0] *= 2.5
    save_file(official_state_dict(reference), str(folder / "model.safetensors"))
    os.symlink(mimi_checkpoint, folder / "mimi-pytorch-e351c8d8@125.safetensors")
    shutil.copy(tokenizer_model, folder / "tokenizer_en_fr_audio_8000.model")
    return reference
