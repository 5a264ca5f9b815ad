"""Streaming generation: one 80 ms step of Moshi per call, full duplex, many conversations.

Each call takes the user's codes for one frame and returns Moshi's text token and audio
codes for one frame, with the stream delays undone. The state is explicit and per batch
slot: `state.reset(mask)` starts a new conversation in some slots while the others go on.
Conversations can run past the temporal transformer's context (3000 steps, 4 minutes): the
KV ring keeps the last `context` steps and RoPE positions keep growing; the model then sees
only the most recent 4 minutes, which is the same window it saw at every step of training.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moshi_core.inference.sampling import SlotSampling, row_seed
from moshi_core.models.lm import UNGENERATED_TOKEN, LMModel
from moshi_core.nn.transformer import KVCache
from moshi_core.params import GpuStep, SamplingParams

StepOutput = tuple[torch.Tensor, torch.Tensor | None]  # codes [A, 1 + dep_q], extra heads' probabilities


@dataclass
class GenerationState:
    tokens: torch.Tensor  # [B, K, max_delay + 2] ring of recent tokens per stream
    offsets: torch.Tensor  # [B] steps taken by each slot
    lm: KVCache  # temporal transformer cache
    sampling: SlotSampling  # every slot's sampling parameters, seed and draw counter
    depth: KVCache | None  # the depth transformer's scratch cache, reset inside every step
    per_slot: bool = False  # slots are configured one by one (`slots.configure`)

    @property
    def slots(self) -> SlotSampling | None:
        """The per-slot sampling to configure; None when every slot takes the generator's."""
        return self.sampling if self.per_slot else None

    def reset(self, mask: torch.Tensor | None = None) -> None:
        if mask is None:
            mask = torch.ones_like(self.offsets, dtype=torch.bool)
        self.tokens.copy_(torch.where(mask[:, None, None], UNGENERATED_TOKEN, self.tokens))
        self.offsets.copy_(torch.where(mask, 0, self.offsets))
        self.lm.reset(mask)
        self.sampling.reset(mask)

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step updates in place."""
        caches = [self.lm] + ([self.depth] if self.depth is not None else [])
        held = [t for c in caches for t in c.tensors()]
        return [self.tokens, self.offsets, *held, *self.sampling.tensors()]


class LMGenerator:
    """Steps an `LMModel` in real time: user codes in, Moshi's text and audio out.

    Two ways to step some slots of a batch, with the same numbers: `rows` steps only those
    slots (fewer rows: faster on a CPU), an `active` mask steps every slot with static shapes
    and advances only the active ones (what one compiled graph or CUDA graph replays).
    """

    def __init__(self, lm: LMModel, sampling: SamplingParams | None = None, seed: int | None = None,
                 gpu_step: GpuStep = "eager") -> None:
        self.lm = lm
        self.sampling = sampling or SamplingParams()
        self.seed = seed
        cfg = lm.cfg
        self.delays = torch.tensor(cfg.delays, device=lm.device)
        self.max_delay = max(cfg.delays)
        self.num_user_streams = cfg.num_codebooks - cfg.dep_q - 1
        self._lockstep: Callable[..., StepOutput] = self._step
        self._static_state = False  # states are marked as fixed addresses, for CUDA graphs
        if lm.device.type == "cuda" and gpu_step != "eager":
            self.compile_step(mode="reduce-overhead" if gpu_step == "cuda-graphs" else "default")

    def compile_step(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Compile the lockstep step (`active` mask, every slot) into one graph: on CUDA from
        `gpu_step`, on any device when called (the CPU default stays eager: compiling takes
        long there). "reduce-overhead" replays it as a CUDA graph."""
        self._lockstep = torch.compile(self._step, fullgraph=True, backend=backend, mode=mode)
        # A CUDA graph may update in place only inputs at fixed addresses: the states made from now on are.
        self._static_state = mode == "reduce-overhead"

    @property
    def compiled(self) -> bool:
        """Whether the lockstep step is compiled (`compile_step`): worth a `warm_up` at load."""
        return self._lockstep != self._step  # a bound method is a new object at each access: compared by value

    def warm_up(self, state: GenerationState, steps: int = 3) -> float:
        """Run the lockstep step a few times on an engine's own `state`, then reset it, so that
        compilation and graph capture happen now (at load), not in a user's first step: a CUDA
        graph is recorded per state (its tensors' addresses), so the one captured now is the
        one the engine's steps replay. Returns the seconds taken."""
        start = time.perf_counter()
        # In inference mode, as the engines step: a graph is specialised to it (and to its inputs' kind).
        with torch.inference_mode():
            batch_size = state.batch_size
            codes = torch.zeros(batch_size, self.num_user_streams, 1, dtype=torch.long, device=self.lm.device)
            active = torch.ones(batch_size, dtype=torch.bool, device=self.lm.device)
            for _ in range(steps):
                self.step(codes, state, active=active)
            if self.lm.extra_heads:
                self.step_with_extra_heads(codes, state, active=active)
            state.reset()
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize(self.lm.device)
        return time.perf_counter() - start

    def init_state(self, batch_size: int = 1, per_slot_sampling: bool = False) -> GenerationState:
        """With `per_slot_sampling`, each slot samples with its own parameters and seed
        (`state.slots.configure(slot, params, seed)`; Kyutai's defaults and a random seed until
        then); otherwise every slot takes the generator's parameters, and its seed mixed with
        the slot index (random when None)."""
        cfg, device = self.lm.cfg, self.lm.device
        tokens = torch.full((batch_size, cfg.num_codebooks, self.max_delay + 2), UNGENERATED_TOKEN, dtype=torch.long,
                            device=device)
        offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        sampling = SlotSampling(batch_size, device)
        for row in range(0 if per_slot_sampling else batch_size):
            sampling.configure(row, self.sampling, None if self.seed is None else row_seed(self.seed, row))
        depth = self.lm.init_depformer_state(batch_size) if cfg.dep_q else None
        state = GenerationState(tokens, offsets, self.lm.init_state(batch_size), sampling, depth, per_slot_sampling)
        if self._static_state:
            for tensor in state.tensors():
                torch._dynamo.mark_static_address(tensor)
        return state

    @torch.no_grad()
    def step(self, user_codes: torch.Tensor, state: GenerationState, rows: torch.Tensor | None = None,
             active: torch.Tensor | None = None) -> torch.Tensor:
        """user_codes [A, >= n_user, 1] -> [A, 1 + dep_q]: text token, then Moshi's audio codes.

        `rows` [A] are the slots of the state stepped (all, in order, when None): conversations
        join and leave a batch between steps, and the others' slots are left as they are.
        Or, with `active` [B] bool, every slot computes (A = B) and only the active slots'
        state advances; the others' outputs are UNGENERATED_TOKEN.
        A slot's first step returns UNGENERATED_TOKEN (-2) everywhere: with an acoustic
        delay of one step, its first complete frame comes out of its second step.
        """
        return self._run(user_codes, state, rows, active, heads=False)[0]

    @torch.no_grad()
    def step_with_extra_heads(self, user_codes: torch.Tensor, state: GenerationState,
                              rows: torch.Tensor | None = None,
                              active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`step`, plus the probabilities of the model's extra heads [A, heads, extra_heads_dim]
        (the speech-to-text model's voice-activity predictions)."""
        return self._run(user_codes, state, rows, active, heads=True)

    def _run(self, user_codes: torch.Tensor, state: GenerationState, rows: torch.Tensor | None,
             active: torch.Tensor | None, heads: bool) -> StepOutput:
        if active is not None and rows is not None:
            raise ValueError("step either `rows` or an `active` mask, not both")
        if active is None:
            return self._step(user_codes, state, rows, None, heads)
        return self._lockstep(user_codes, state, None, active, heads)

    def _step(self, user_codes: torch.Tensor, state: GenerationState, rows: torch.Tensor | None,
              active: torch.Tensor | None, heads: bool) -> StepOutput:
        """The whole step, free of host syncs (no `.item()`, no branch on a tensor's value):
        compiled, it is one graph."""
        lm, cfg = self.lm, self.lm.cfg
        A = state.batch_size if rows is None else rows.shape[0]
        if user_codes.dim() != 3 or user_codes.shape[0] != A or user_codes.shape[2] != 1:
            raise ValueError(f"user codes must be [{A}, {self.num_user_streams}, 1], got {list(user_codes.shape)}")
        if user_codes.shape[1] < self.num_user_streams:
            raise ValueError(f"need {self.num_user_streams} user codebooks, got {user_codes.shape[1]}")
        # The stepped slots' token rings and step counts, as new tensors: written back below,
        # for the active slots only under a mask.
        tokens = (state.tokens if rows is None else state.tokens[rows]).clone()
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

        z, text_logits = lm.forward_text(inputs, state.lm, rows=rows, active=active)
        text = state.sampling.sample(text_logits[:, 0, 0], True, rows, active)
        depth = None if state.depth is None else state.depth.first(A)
        audio = depth_step(lm, text, z, lambda logits: state.sampling.sample(logits, False, rows, active),
                           cache=depth)

        offsets = offsets + 1
        written = (offsets % ring)[:, None, None]
        tokens[:, : 1 + cfg.dep_q].scatter_(
            2, written.expand(-1, 1 + cfg.dep_q, 1), torch.cat([text[:, None], audio], dim=1)[..., None]
        )
        if active is not None:
            state.tokens.copy_(torch.where(active[:, None, None], tokens, state.tokens))
            state.offsets.copy_(torch.where(active, offsets, state.offsets))
        elif rows is None:
            state.tokens.copy_(tokens)
            state.offsets.copy_(offsets)
        else:
            state.tokens[rows] = tokens
            state.offsets[rows] = offsets
        # Undo the delays: stream k of the frame returned now was written d_k steps after it started.
        gen_delays = self.delays[: 1 + cfg.dep_q]
        read = (offsets[:, None] - self.max_delay + gen_delays) % ring
        out = tokens[:, : 1 + cfg.dep_q].gather(2, read[..., None])[..., 0]
        pending = offsets <= self.max_delay
        if active is not None:
            pending = pending | ~active
        out = torch.where(pending[:, None], UNGENERATED_TOKEN, out)
        if not heads:
            return out, None
        probs = [F.softmax(head(z[:, 0]).float(), dim=-1) for head in lm.extra_heads]
        return out, torch.stack(probs, dim=1) if probs else z.new_zeros(A, 0, cfg.extra_heads_dim)


AudioSampler = Callable[[torch.Tensor], torch.Tensor]  # logits [A, card] -> tokens [A]


def depth_step(lm: LMModel, text: torch.Tensor, z: torch.Tensor, sample: AudioSampler,
               cache: KVCache | None = None) -> torch.Tensor:
    """The dep_q audio codes of one step, codebook after codebook: [A, dep_q].

    Each codebook is conditioned on the token just chosen before it (the text token for the
    first); `sample` chooses it, with whatever per-row parameters the caller keeps. `cache`
    (A streams, from `lm.init_depformer_state`) is reused, reset here; a new one when None."""
    if lm.cfg.dep_q == 0:  # text only (speech-to-text): no depth transformer
        return text.new_zeros(text.shape[0], 0)
    if cache is None:
        cache = lm.init_depformer_state(text.shape[0])
    cache.reset()
    previous, codes = text, []
    for slot in range(lm.cfg.dep_q):
        previous = sample(lm.depformer_logits(slot, z, previous[:, None], cache)[:, 0])
        codes.append(previous)
    return torch.stack(codes, dim=1)
