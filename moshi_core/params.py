"""What a request may ask for: plain, validated settings shared by every front door.

The API, the CLI, the UI and the workers build these from their inputs, so a value is
checked the same way (and means the same) whichever door it came through; nothing here
imports model code, so the API process can check requests without loading any.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from moshi_core.errors import InvalidParameterError

# How a server runs its models: the weights' and compute's dtype (torch's names) ...
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# ... and how LM steps run on CUDA: eager, `torch.compile`, or compiled into CUDA graphs (the
# default; no effect on a CPU, which steps eagerly).
GpuStep = Literal["eager", "compile", "cuda-graphs"]
GPU_STEPS: tuple[GpuStep, ...] = ("eager", "compile", "cuda-graphs")
# Kyutai's switches off, as its own code reads them: set and not "0" means on.
NO_TORCH_COMPILE, NO_CUDA_GRAPH = "NO_TORCH_COMPILE", "NO_CUDA_GRAPH"
# ... and whether float checkpoints are turned into 8-bit Q8_0 as they load (`load_lm`).
QUANTIZE_MODES = ("none", "q8")


def gpu_step_for(no_torch_compile: bool, no_cuda_graph: bool) -> GpuStep:
    """The GPU step Kyutai's switches leave: NO_TORCH_COMPILE wins (eager), NO_CUDA_GRAPH
    compiles without graphs, neither compiles into CUDA graphs."""
    return "eager" if no_torch_compile else "compile" if no_cuda_graph else "cuda-graphs"


def compile_mode(gpu_step: GpuStep) -> str:
    """`torch.compile`'s mode for a compiled GPU step: CUDA graphs are its "reduce-overhead"."""
    return "reduce-overhead" if gpu_step == "cuda-graphs" else "default"


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



@dataclass(frozen=True)
class SamplingOverrides:
    """What one request changes of a model's sampling: None keeps the value of the model's
    `lm_gen_config` (or Kyutai's default). The API, the CLI and the UI all take these, so a
    request means the same whichever door it came through."""

    temp_text: float | None = None
    top_k_text: int | None = None
    temp_audio: float | None = None
    top_k_audio: int | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        self.resolve({})  # out-of-range values fail here, before any model work

    def resolve(self, lm_gen_config: Mapping) -> SamplingParams:
        given = {"temp_text": self.temp_text, "top_k_text": self.top_k_text, "temp": self.temp_audio,
                 "top_k": self.top_k_audio, "use_sampling": False if self.greedy else None}
        return SamplingParams.from_config({**lm_gen_config, **{k: v for k, v in given.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)

@dataclass(frozen=True)
class TTSParams:
    """Generation settings of one request; the defaults are Kyutai's for this model."""

    temp: float = 0.6  # text and audio alike
    top_k: int = 250
    top_k_text: int = 25
    cfg_coef: float = 2.0  # distilled CFG: one of the model's `cfg` values (1.0 ... 4.0)
    padding_between: int = 1  # extra pads forced after each word: clearer articulation
    max_padding: int = 8
    initial_padding: int = 2
    final_padding: int = 4
    padding_bonus: float = 0.0  # added to the pad logit: > 0 speaks slower
    max_steps: int = 30000
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise InvalidParameterError("max_steps must be >= 1")
        for name in ("padding_between", "max_padding", "initial_padding", "final_padding"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(f"{name} must be >= 0")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temp_text=self.temp, top_k_text=self.top_k_text, temp=self.temp, top_k=self.top_k)
