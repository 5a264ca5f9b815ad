"""Our C++ CPU kernels (`csrc/`), for x86-64 CPUs with AVX2, FMA and F16C. They are one
extension, built with `torch.utils.cpp_extension` on first use and cached afterwards in
`build_directory()` (about a minute on two cores: `moshi-core build-kernels` builds it ahead,
as `make setup` and the Docker image do). Without a compiler or those instructions every
caller takes its portable PyTorch path, and `set_enabled(False)` turns them off (the front
doors do, from `MOSHI_CPU_KERNELS=0` or a flag: the core reads no environment of its own).

- `linear.cpp`: matrix products with a few activation rows, for float32, bfloat16, float16
  and Q8_0 weights (see `moshi_core.kernels.linear`).
- `attention.cpp`: one streaming step of self-attention over a ring KV cache, fused (see
  `moshi_core.nn.transformer.Attention.step`).
- `norm.cpp`: RMSNorm and the SiLU gate of a few rows, fused.
"""

import fcntl
import functools
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
NAME = "moshi_core_kernels"
# common.h first: the sources are one translation unit. Their text is what the build cache is keyed on.
SOURCES = ("common.h", "linear.cpp", "attention.cpp", "norm.cpp")
FUNCTIONS = ["skinny_linear", "q8_linear", "attention_step", "rms_norm", "silu_mul"]


# A plain module flag: the lookup runs for every matrix product of a step.
ENABLED = True


def set_enabled(flag: bool) -> None:
    """Use the kernels (the default) or PyTorch's own ops everywhere, e.g. for comparisons."""
    global ENABLED
    ENABLED = flag


@functools.cache
def supported() -> bool:
    """Whether this CPU has the instructions the kernels are built for."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def build_directory() -> Path:
    """Where the extension is built and cached: under `TORCH_EXTENSIONS_DIR` (else PyTorch's
    default root), one folder per Python and torch version, since the binary is tied to both."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '-')}"
    return Path(root) / f"{NAME}-{tag}"


@functools.cache
def kernels():
    """The compiled extension, or None where it cannot be built (the reason is logged)."""
    try:
        if not supported():
            raise RuntimeError("this CPU lacks AVX2, FMA or F16C")
        from torch.utils.cpp_extension import load_inline

        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        sources = [(CSRC / name).read_text() for name in SOURCES]
        # PyTorch guards a build with a `lock` file that a killed process leaves behind, and
        # then every later load waits on it forever. Our own lock is released by the OS when
        # its holder dies, so while we hold it a `lock` file can only be such a leftover.
        with open(folder / "moshi.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            return load_inline(NAME, cpp_sources=sources, functions=FUNCTIONS, extra_cflags=CFLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    except Exception as exc:  # any build problem means: use the portable path
        log.warning("CPU kernels unavailable (%s); using the portable path", exc)
        return None


def kernel_for(x: torch.Tensor):
    """The extension to run on `x`, or None (not on a CPU, turned off, or not buildable)."""
    if not ENABLED or x.device.type != "cpu":
        return None
    return kernels()
