"""A dialogue asked without a seed reports the one it drew, and that seed gives its answer again."""

import torch

from moshi_core.formats.audio import load_audio
from workers.dialogue_engine import DialogueEngine


def test_an_unseeded_dialogue_reports_a_seed_that_reproduces_it(tiny_models, shared_audio):
    engine = DialogueEngine(tiny_models, slots=2)
    wav = load_audio(shared_audio / "en_short_16k.wav")[:, :24000]
    first, second = engine.run([wav, wav])  # each drew its own seed
    assert first.seed != second.seed and 0 <= first.seed < 2**31
    assert not torch.equal(first.tokens, second.tokens)  # so the seed decides the answer
    again = engine.run(wav, seed=first.seed)
    assert again.seed == first.seed
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.audio, first.audio)
