"""Streaming generation: one 80 ms step of Moshi per call, full duplex, many conversations.

Each call takes the user's codes for one frame and returns Moshi's text token and audio
codes for one frame, with the stream delays undone. The state is explicit and per batch
slot: `state.reset(mask)` starts a new conversation in some slots while the others go on.
Conversations can run past the temporal transformer's context (3000 steps, 4 minutes): the
KV ring keeps the last `context` steps and RoPE positions keep growing; the model then sees
only the most recent 4 minutes, which is the same window it saw at every step of training.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moshi_core.inference.sampling import SlotSampling, sample_token
from moshi_core.models.lm import UNGENERATED_TOKEN, LMModel
from moshi_core.nn.transformer import KVCache
from moshi_core.params import GpuStep, SamplingParams


def _gpu_compiled(lm: LMModel, gpu_step: GpuStep):
    """The temporal and depth steps, compiled on CUDA when asked: "compile" uses
    `torch.compile`, "cuda-graphs" its CUDA-graph mode (reduce-overhead). Eager by default and
    NOT MEASURED yet (no GPU was lent to the benchmarks); the CPU step stays eager (compiling
    it took ~50 s per process for Mimi's step)."""
    if lm.device.type != "cuda" or gpu_step == "eager":
        return lm.forward_text, lm.depformer_logits
    mode = "reduce-overhead" if gpu_step == "cuda-graphs" else "default"
    return torch.compile(lm.forward_text, mode=mode), torch.compile(lm.depformer_logits, mode=mode)


@dataclass
class GenerationState:
    tokens: torch.Tensor  # [B, K, max_delay + 2] ring of recent tokens per stream
    offsets: torch.Tensor  # [B] steps taken by each slot
    lm: KVCache  # temporal transformer cache
    slots: SlotSampling | None = None  # per-slot sampling; None: the generator's own for every slot

    def reset(self, mask: torch.Tensor | None = None) -> None:
        if mask is None:
            mask = torch.ones_like(self.offsets, dtype=torch.bool)
        self.tokens.copy_(torch.where(mask[:, None, None], UNGENERATED_TOKEN, self.tokens))
        self.offsets.copy_(torch.where(mask, 0, self.offsets))
        self.lm.reset(mask)

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0]


class LMGenerator:
    """Steps an `LMModel` in real time: user codes in, Moshi's text and audio out."""

    def __init__(self, lm: LMModel, sampling: SamplingParams | None = None, seed: int | None = None,
                 gpu_step: GpuStep = "eager") -> None:
        self.lm = lm
        self.sampling = sampling or SamplingParams()
        cfg = lm.cfg
        self.delays = torch.tensor(cfg.delays, device=lm.device)
        self.max_delay = max(cfg.delays)
        self.num_user_streams = cfg.num_codebooks - cfg.dep_q - 1
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=lm.device).manual_seed(seed)
        self._forward_text, self._depformer_logits = _gpu_compiled(lm, gpu_step)

    def init_state(self, batch_size: int = 1, per_slot_sampling: bool = False) -> GenerationState:
        """With `per_slot_sampling`, each slot samples with its own parameters and generator
        (`state.slots.configure(slot, params, seed)`), not the generator's shared ones."""
        cfg = self.lm.cfg
        tokens = torch.full(
            (batch_size, cfg.num_codebooks, self.max_delay + 2), UNGENERATED_TOKEN, dtype=torch.long,
            device=self.lm.device,
        )
        offsets = torch.zeros(batch_size, dtype=torch.long, device=self.lm.device)
        slots = SlotSampling(batch_size, self.lm.device) if per_slot_sampling else None
        return GenerationState(tokens, offsets, self.lm.init_state(batch_size), slots)

    @torch.no_grad()
    def step(self, user_codes: torch.Tensor, state: GenerationState, rows: torch.Tensor | None = None) -> torch.Tensor:
        """user_codes [A, >= n_user, 1] -> [A, 1 + dep_q]: text token, then Moshi's audio codes.

        `rows` [A] are the slots of the state stepped (all, in order, when None): conversations
        join and leave a batch between steps, and the others' slots are left as they are.
        A slot's first step returns UNGENERATED_TOKEN (-2) everywhere: with an acoustic
        delay of one step, its first complete frame comes out of its second step.
        """
        return self._step(user_codes, state, rows)[0]

    @torch.no_grad()
    def step_with_extra_heads(self, user_codes: torch.Tensor, state: GenerationState,
                              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`step`, plus the probabilities of the model's extra heads [A, heads, extra_heads_dim]
        (the speech-to-text model's voice-activity predictions)."""
        out, z = self._step(user_codes, state, rows)
        heads = [F.softmax(head(z[:, 0]).float(), dim=-1) for head in self.lm.extra_heads]
        return out, torch.stack(heads, dim=1) if heads else z.new_zeros(z.shape[0], 0, self.lm.cfg.extra_heads_dim)

    def _step(self, user_codes: torch.Tensor, state: GenerationState,
              rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        lm, cfg = self.lm, self.lm.cfg
        A = state.batch_size if rows is None else rows.shape[0]
        if user_codes.dim() != 3 or user_codes.shape[0] != A or user_codes.shape[2] != 1:
            raise ValueError(f"user codes must be [{A}, {self.num_user_streams}, 1], got {list(user_codes.shape)}")
        if user_codes.shape[1] < self.num_user_streams:
            raise ValueError(f"need {self.num_user_streams} user codebooks, got {user_codes.shape[1]}")
        # The stepped slots' token rings and step counts (copies when a subset is stepped, written back below).
        tokens = state.tokens if rows is None else state.tokens[rows]
        offsets = state.offsets if rows is None else state.offsets[rows]
        ring = tokens.shape[2]
        first_user = cfg.dep_q + 1
        # The user's stream k is written d_k steps ahead: it is read when the model reaches it.
        user_slots = (offsets[:, None] + self.delays[first_user:]) % ring  # [A, n_user]
        tokens[:, first_user:].scatter_(2, user_slots[..., None], user_codes[:, : self.num_user_streams])

        current = (offsets % ring)[:, None, None].expand(-1, cfg.num_codebooks, 1)
        inputs = tokens.gather(2, current)
        before_start = offsets[:, None, None] <= self.delays[None, :, None]
        inputs = torch.where(before_start, lm.initial_tokens(A), inputs)

        z, text_logits = self._forward_text(inputs, state.lm, rows=rows)
        slots = None if rows is None else rows.tolist()  # once a step: 9 samplings read it
        text = self._sample(text_logits[:, 0, 0], state, slots, text=True)
        audio = depth_step(lm, text, z, lambda logits: self._sample(logits, state, slots, text=False),
                           self._depformer_logits)

        offsets = offsets + 1
        written = (offsets % ring)[:, None, None]
        tokens[:, : 1 + cfg.dep_q].scatter_(
            2, written.expand(-1, 1 + cfg.dep_q, 1), torch.cat([text[:, None], audio], dim=1)[..., None]
        )
        if rows is None:
            state.offsets.copy_(offsets)
        else:
            state.tokens[rows] = tokens
            state.offsets[rows] = offsets
        # Undo the delays: stream k of the frame returned now was written d_k steps after it started.
        gen_delays = self.delays[: 1 + cfg.dep_q]
        read = (offsets[:, None] - self.max_delay + gen_delays) % ring
        out = tokens[:, : 1 + cfg.dep_q].gather(2, read[..., None])[..., 0]
        return torch.where((offsets <= self.max_delay)[:, None], UNGENERATED_TOKEN, out), z

    def _sample(self, logits: torch.Tensor, state: GenerationState, slots: list[int] | None,
                text: bool) -> torch.Tensor:
        if state.slots is not None:
            return state.slots.sample(logits, text, slots)
        return sample_token(logits, *self.sampling.for_stream(text), self.sampling.use_sampling, self.generator)


AudioSampler = Callable[[torch.Tensor], torch.Tensor]  # logits [A, card] -> tokens [A]


def depth_step(lm: LMModel, text: torch.Tensor, z: torch.Tensor, sample: AudioSampler,
               depformer_logits: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """The dep_q audio codes of one step, codebook after codebook: [A, dep_q].

    Each codebook is conditioned on the token just chosen before it (the text token for the
    first); `sample` chooses it, with whatever per-row parameters and generators the caller
    keeps. `depformer_logits` replaces `lm.depformer_logits` (a compiled one)."""
    if lm.cfg.dep_q == 0:  # text only (speech-to-text): no depth transformer
        return text.new_zeros(text.shape[0], 0)
    logits_of = depformer_logits or lm.depformer_logits
    cache = lm.init_depformer_state(text.shape[0])
    previous, codes = text, []
    for slot in range(lm.cfg.dep_q):
        previous = sample(logits_of(slot, z, previous[:, None], cache)[:, 0])
        codes.append(previous)
    return torch.stack(codes, dim=1)
