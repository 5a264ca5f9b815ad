"""Token sampling per batch row (one row per conversation): temperature, top-k, greedy.

Why counter-based randomness: a step that draws with `torch.Generator`s cannot be captured
in one graph (every draw with a generator is a graph break) and samples row by row. Here
each row's randomness is a pure function of tensors: the noise of vocabulary entry v in a
row's n-th draw is `hash(seed, n, v)`, integer mixing rounds on int64 tensors that stay
below 2^63 (32-bit values, multipliers < 2^31, masked to 32 bits), turned into a uniform u
in (0, 1). A draw is the exponential race `argmax_v p_v / E_v` with E = -log u, which is a
categorical draw from p without a host sync. A row's token depends only on its own seed,
draw counter and logits, so a conversation draws the same alone or batched with others,
stepped as a subset of rows or as the whole batch under an active mask.

Top-k with static shapes: each draw takes the `candidates` largest logits (`topk`, a size
fixed per stream) and races over the first k of them (per-row k, as a rank mask). The
candidate count is the smallest power of two (at least 32) that holds every configured
top-k, the whole vocabulary when some row keeps every token; it only grows, so a compiled
step recompiles at most a few times over an engine's life, when a request first asks for
a larger top-k than any before it. Greedy rows (temperature <= 0 or no sampling) take the
argmax through `torch.where`: no Python branch reads a tensor.
"""

import secrets
from dataclasses import dataclass

import torch

from moshi_core.errors import InvalidParameterError
from moshi_core.params import SamplingParams

_M32 = 0xFFFFFFFF
# Odd multipliers below 2^31: a 32-bit value times one stays below 2^63 (no int64 overflow).
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)
_GOLDEN = 0x9E3779B9  # spreads vocabulary entries (and row indices) over 32 bits
_UNIFORM_BITS = 23  # float32 holds (23-bit integer + 0.5) exactly
MIN_CANDIDATES = 32
KEEP_ALL = 2**62  # a top-k larger than any vocabulary


# Method calls, not `>>` and `&`: the operators' Python wrappers cost twice the op on a CPU step.
def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit xorshift-multiply permutation (lowbias32-style) of int64 values in [0, 2^32)."""
    for multiplier in _MULTIPLIERS:
        x = x ^ x.bitwise_right_shift(16)
        x = x.mul(multiplier).bitwise_and(_M32)
    return x ^ x.bitwise_right_shift(15)


def seed_key(seeds: torch.Tensor) -> torch.Tensor:
    """The 32-bit key of int64 seeds, computed once per seed (`configure`), not every draw.

    Two seeds share a key, hence their draws, with probability 2^-32."""
    return _mix(_mix(seeds.bitwise_right_shift(32).bitwise_and(_M32)) ^ seeds.bitwise_and(_M32))


def uniform_noise(keys: torch.Tensor, draws: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """u = hash(seed, n, v) in (0, 1), float32 [A, N], for the seeds' keys [A] (`seed_key`),
    draw counters n [A] and vocabulary entries vocab [A, N]."""
    # A new key per draw; counters past 2^32 (15 months of one conversation) start over.
    key = _mix((keys ^ draws).bitwise_and(_M32))
    bits = _mix(key[:, None] ^ vocab.mul(_GOLDEN).bitwise_and(_M32))
    return bits.bitwise_right_shift(32 - _UNIFORM_BITS).float().add(0.5).mul(2.0 ** -_UNIFORM_BITS)


def sample_token(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, greedy: torch.Tensor,
                 keys: torch.Tensor, draws: torch.Tensor, candidates: int) -> torch.Tensor:
    """One token per row of logits [A, V] -> [A], each row with its own temperature [A]
    (> 0 where sampled), top-k [A] (tokens kept, >= V keeps all), greedy flag [A], seed key [A]
    and draw counter [A]; the race runs over the `candidates` largest logits of each row."""
    values, vocab = logits.float().topk(min(candidates, logits.shape[-1]), dim=-1)  # sorted, descending
    # The exponential race argmax(p / E) in logarithms: log p = logits / T + const, E = -log u.
    race = values / temperature[:, None] - torch.log(-torch.log(uniform_noise(keys, draws, vocab)))
    ranks = torch.arange(vocab.shape[-1], device=logits.device)
    race = torch.where(ranks < top_k[:, None], race, -torch.inf)
    sampled = vocab.gather(-1, race.argmax(dim=-1, keepdim=True))[:, 0]
    # Greedy: the first of the largest logits, as `argmax` picks (topk orders ties its own way).
    best = torch.where(values == values[:, :1], vocab, logits.shape[-1]).amin(dim=-1)
    return torch.where(greedy, best, sampled)


def candidates_for(top_k: int, vocab_size: int) -> int:
    """How many candidates a draw with this top-k needs (see the module docstring)."""
    if top_k <= 0 or top_k >= vocab_size:
        return vocab_size
    return min(vocab_size, max(MIN_CANDIDATES, 1 << (top_k - 1).bit_length()))


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a generator seeded with `seed`: row 0 keeps the seed itself,
    so a lone conversation with seed s draws as a slot configured with seed s."""
    return (seed + row * _GOLDEN * (_GOLDEN + 2)) % 2**64


def _as_int64(seed: int) -> int:
    """A seed in [-2^63, 2^64) as the signed 64-bit value with the same bits."""
    if not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise InvalidParameterError(f"a seed is an integer in [0, 2**64), not {seed!r}")
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed


@dataclass
class _Stream:
    """The text or the audio streams' parameters of every row, as tensors the step reads."""

    temperature: torch.Tensor  # [B] float32, 1 where greedy (never divides by 0)
    top_k: torch.Tensor  # [B] int64, KEEP_ALL where the request's 0 keeps every token
    greedy: torch.Tensor  # [B] bool
    largest_top_k: int = 1  # of the sampled rows configured so far: sizes the candidates, only grows


class SlotSampling:
    """Sampling parameters, a seed and a draw counter per batch row, all held in tensors.

    `configure` writes host values between steps; `sample` is graph-safe: it reads and
    advances tensors only. A row's draws depend on its seed, its counter and its logits, never
    on the other rows, so the same seed and input give the same conversation alone or among others.
    """

    def __init__(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.params = [SamplingParams()] * batch_size
        self.keys = torch.zeros(batch_size, dtype=torch.long, device=device)  # `seed_key` of each row's seed
        self.draws = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Rows configured without a seed draw a fresh one each time they restart.
        self.unseeded = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.streams = {text: self._stream(batch_size, device) for text in (True, False)}
        for row in range(batch_size):
            self.configure(row, SamplingParams())

    @staticmethod
    def _stream(batch_size: int, device: torch.device | str) -> _Stream:
        return _Stream(torch.ones(batch_size, device=device), torch.zeros(batch_size, dtype=torch.long, device=device),
                       torch.ones(batch_size, dtype=torch.bool, device=device))

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step reads or updates."""
        streams = [t for s in self.streams.values() for t in (s.temperature, s.top_k, s.greedy)]
        return [self.keys, self.draws, self.unseeded, *streams]

    def configure(self, row: int, params: SamplingParams, seed: int | None = None) -> None:
        """New parameters and seed for a row (a fresh random seed when None); its draws restart."""
        self.keys[row] = seed_key(torch.tensor(secrets.randbits(63) if seed is None else _as_int64(seed)))
        self.params[row] = params
        self.draws[row] = 0
        self.unseeded[row] = seed is None
        for text, stream in self.streams.items():
            temperature, top_k = params.for_stream(text)
            top_k = top_k if top_k > 0 else KEEP_ALL
            greedy = not params.use_sampling or temperature <= 0
            stream.temperature[row] = 1.0 if greedy else temperature
            stream.top_k[row] = top_k
            stream.greedy[row] = greedy
            if not greedy:
                stream.largest_top_k = max(stream.largest_top_k, top_k)

    def reset(self, mask: torch.Tensor) -> None:
        """Restart the draws of the rows where `mask` [B] is True (unseeded rows get new seeds)."""
        fresh = seed_key(torch.tensor([secrets.randbits(63) for _ in range(self.batch_size)])).to(self.keys.device)
        self.keys.copy_(torch.where(mask & self.unseeded, fresh, self.keys))
        self.draws.masked_fill_(mask, 0)

    def sample(self, logits: torch.Tensor, text: bool, rows: torch.Tensor | None = None,
               active: torch.Tensor | None = None) -> torch.Tensor:
        """logits [A, V] -> [A]: one token per row with its slot's parameters and counter; row
        i belongs to slot rows[i] (to slot i when `rows` is None). With `active` [B] (rows
        None), only the active rows' counters advance."""
        stream = self.streams[text]
        candidates = candidates_for(stream.largest_top_k, logits.shape[-1])
        if rows is None:
            tokens = sample_token(logits, stream.temperature, stream.top_k, stream.greedy, self.keys, self.draws,
                                  candidates)
            self.draws.add_(1 if active is None else active.long())
            return tokens
        if active is not None:
            raise ValueError("sample either `rows` or an `active` mask, not both")
        draws = self.draws[rows]
        tokens = sample_token(logits, stream.temperature[rows], stream.top_k[rows], stream.greedy[rows],
                              self.keys[rows], draws, candidates)
        self.draws[rows] = draws + 1
        return tokens
