"""Token sampling: temperature, top-k, greedy; sync-free and reproducible with a generator."""

import secrets

import torch

from moshi_core.params import SamplingParams


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, use_sampling: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits [..., V] -> [...].

    Sampling is softmax(logits / T) restricted to the top k, drawn as argmax(p / E) with
    E ~ Exponential(1), which is a categorical draw without a host sync.
    """
    if not use_sampling or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    indices = None
    if 0 < top_k < probs.shape[-1]:
        probs, indices = probs.topk(top_k, dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    choice = (probs / race).argmax(dim=-1, keepdim=True)
    if indices is not None:
        choice = indices.gather(-1, choice)
    return choice[..., 0]


class SlotSampling:
    """Sampling parameters and a random generator per batch row (one row per conversation).

    Each row is sampled on its own, with its own generator, exactly as a batch of one with
    that generator would be: a conversation's draws do not depend on who shares the batch,
    so the same seed and input give the same conversation alone or among others.
    """

    def __init__(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.params = [SamplingParams()] * batch_size
        self.generators = [torch.Generator(device=device) for _ in range(batch_size)]

    def configure(self, row: int, params: SamplingParams, seed: int | None = None) -> None:
        """New parameters for a row, and its generator reseeded (a fresh random seed when None)."""
        self.params[row] = params
        self.generators[row].manual_seed(secrets.randbits(63) if seed is None else seed)

    def sample(self, logits: torch.Tensor, text: bool, rows: list[int] | None = None) -> torch.Tensor:
        """logits [A, V] -> [A]: one token per row with its slot's parameters and generator;
        row i belongs to slot rows[i] (to slot i when `rows` is None)."""
        slots = range(logits.shape[0]) if rows is None else rows
        tokens = [
            sample_token(logits[i : i + 1], *self.params[slot].for_stream(text), self.params[slot].use_sampling,
                         self.generators[slot])
            for i, slot in enumerate(slots)
        ]
        return torch.cat(tokens)
