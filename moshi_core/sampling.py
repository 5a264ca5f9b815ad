"""Token sampling: temperature, top-k, greedy; sync-free and reproducible with a generator."""

import secrets
from dataclasses import dataclass

import torch

from .errors import InvalidParameterError


@dataclass(frozen=True)
class SamplingParams:
    """Per-stream temperature and top-k (Kyutai's defaults); temperature <= 0 means greedy."""

    temp_text: float = 0.7
    top_k_text: int = 25
    temp: float = 0.8
    top_k: int = 250
    use_sampling: bool = True

    def __post_init__(self) -> None:
        for name in ("temp_text", "temp"):
            value = getattr(self, name)
            if not 0 <= value <= 10:
                raise InvalidParameterError(f"{name} must be between 0 and 10, not {value}")
        for name in ("top_k_text", "top_k"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(f"{name} must be >= 0 (0 keeps every token)")

    def for_stream(self, text: bool) -> tuple[float, int]:
        """(temperature, top-k) of the text stream or of the audio streams."""
        return (self.temp_text, self.top_k_text) if text else (self.temp, self.top_k)

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(use_sampling=False)

    @classmethod
    def from_config(cls, lm_gen_config: dict) -> "SamplingParams":
        """From a repo's `lm_gen_config` (Kyutai's `LMGen` keyword names); other keys are for
        other features (CFG, ...) and are left out."""
        names = {"temp", "temp_text", "top_k", "top_k_text", "use_sampling"}
        return cls(**{k: v for k, v in lm_gen_config.items() if k in names})


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
