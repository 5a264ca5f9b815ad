"""A small random Mimi (Mimi's layout and strides, few channels) for the lockstep and compile
tests: the full-size model steps too slowly for hundreds of compiled steps on 2 CPU cores."""

import torch

from moshi_core.models.mimi import MimiConfig, MimiModel
from moshi_core.nn.rvq import QuantizerConfig
from moshi_core.nn.seanet import SeanetConfig
from moshi_core.nn.transformer import TransformerConfig


def tiny_mimi(seed: int = 0) -> MimiModel:
    """Random weights; the attention context is 6 steps, so a few frames wrap its ring cache."""
    torch.manual_seed(seed)
    cfg = MimiConfig(
        seanet=SeanetConfig(n_filters=4, dimension=32),
        transformer=TransformerConfig(d_model=32, num_heads=2, num_layers=2, dim_feedforward=64, context=6,
                                      input_dimension=32, output_dimensions=(32,)),
        quantizer=QuantizerConfig(dimension=16, n_q=8, bins=64, input_dimension=32, output_dimension=32),
    )
    mimi = MimiModel(cfg).eval()
    with torch.no_grad():  # the codebooks start at zero: all ties, every code 0
        for layer in [*mimi.quantizer.rvq_first.vq.layers, *mimi.quantizer.rvq_rest.vq.layers]:
            layer._codebook.embedding_sum.normal_()
    return mimi
