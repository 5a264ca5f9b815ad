"""Bytes of weights a step must read: what a bound divides by the read bandwidth."""

import torch

# A Mimi frame goes through the encoder's parts to become codes, and through the decoder's to
# become audio again; the quantizer's codebooks are read both ways.
MIMI_PARTS = {
    "encode": ("encoder.", "encoder_transformer.", "downsample.", "quantizer."),
    "decode": ("quantizer.", "upsample.", "decoder_transformer.", "decoder."),
}


def step_bytes(model: torch.nn.Module) -> int:
    """An LM step: all weights but the embedding tables (one row each is read), 8-bit ones
    as their int8 values and float16 scales."""
    from moshi_core.kernels.q8 import QuantizedWeight

    total = 0
    for name, p in model.named_parameters():
        if "emb" not in name:
            total += p.numel() * p.element_size()
    for name, module in model.named_modules():
        if "emb" not in name:
            for w in vars(module).values():
                if isinstance(w, QuantizedWeight):
                    total += w.nbytes
    return total


def mimi_bytes(mimi: torch.nn.Module, way: str) -> int:
    """One Mimi frame encoded (`way="encode"`) or decoded (`"decode"`): its tensors on that way."""
    parts = MIMI_PARTS[way]
    return sum(t.numel() * t.element_size() for name, t in mimi.state_dict().items()
               if name.startswith(parts) and t.is_floating_point())
