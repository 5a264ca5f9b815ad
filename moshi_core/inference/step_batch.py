"""Which rows one batched step computes: the stepped slots' rows only, or every slot in lockstep.

Two ways to step some slots of a batched state, with the same numbers: only their rows (fewer
rows to compute: faster on a CPU), or every slot under an active mask that decides whose state
advances (one static shape: what one compiled graph or CUDA graph replays, on CUDA). The
engines and the STT and TTS loops describe each step as a `StepBatch` and pass its `rows` and
`active` to the LM and Mimi steps.
"""

from dataclasses import dataclass

import torch


def lockstep_default(device: torch.device) -> bool:
    """Engines step in lockstep on CUDA (graphs replay one shape), by rows elsewhere."""
    return device.type == "cuda"


@dataclass(frozen=True)
class StepBatch:
    """How one step covers `slots` of an engine of `size` slots: their rows only, or
    (`lockstep`) every slot, with only `slots` active."""

    slots: list[int]  # distinct, in any order: the order of the inputs' and outputs' rows
    size: int
    lockstep: bool

    @property
    def every_slot(self) -> bool:
        """Every slot steps, in slot order: the whole batch, no gather, no scatter."""
        return self.slots == list(range(self.size))

    def rows(self, device: torch.device | str) -> torch.Tensor | None:
        """The step's `rows`: None in lockstep, or when every slot steps."""
        if self.lockstep or self.every_slot:
            return None
        return torch.tensor(self.slots, device=device)

    def active(self, device: torch.device | str) -> torch.Tensor | None:
        """The step's `active` mask [size] in lockstep, else None."""
        if not self.lockstep:
            return None
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[self.slots] = True
        return mask.to(device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x [A, ...] for the stepped slots -> the step's input: in lockstep [size, ...], the
        slots not stepped given zeros (valid audio and codes, their results ignored)."""
        if not self.lockstep or self.every_slot:
            return x
        full = x.new_zeros(self.size, *x.shape[1:])
        full[torch.tensor(self.slots, device=x.device)] = x
        return full

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """full [size, ...] -> the step's rows of it: the stepped slots' by rows, all in lockstep."""
        rows = self.rows(full.device)
        return full if rows is None else full[rows]

    def put(self, full: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """full [size, ...] with the stepped slots' rows from the step's result y (a new tensor,
        never y itself in lockstep: see `outputs`)."""
        if self.lockstep:
            return torch.where(self.active(full.device).view(-1, *[1] * (full.dim() - 1)), y, full)
        if self.every_slot:
            return y
        full = full.clone()
        full[self.rows(full.device)] = y
        return full

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        """The step's output -> [A, ...], the stepped slots' rows. In lockstep always a copy:
        a CUDA graph's outputs live in its memory pool, overwritten by its next replay, and
        callers keep them (a dialogue's frames)."""
        if not self.lockstep:
            return y
        return y[torch.tensor(self.slots, device=y.device)]
