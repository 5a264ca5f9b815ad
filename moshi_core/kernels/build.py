"""Our C++ CPU kernels (`csrc/`), for x86-64 CPUs with AVX2, FMA and F16C. They are one
extension, built with `torch.utils.cpp_extension` on first use and cached afterwards in
`build_directory()`, one folder per environment (about a minute on two cores, once:
`moshi-core build-kernels` builds it ahead, as `make setup` and the Docker image do).
Without a compiler or those instructions every caller takes its portable PyTorch path, and
`set_enabled(False)` turns them off (the front doors do, from `MOSHI_CPU_KERNELS=0` or a
flag: the core reads no environment of its own).

- `linear.cpp`: matrix products with a few activation rows, for float32, bfloat16, float16
  and Q8_0 weights (see `moshi_core.kernels.linear`), Q8_0 with float or int8 activations
  (see `moshi_core.kernels.q8`).
- `attention.cpp`: one streaming step of self-attention over a ring KV cache, fused (see
  `moshi_core.nn.transformer.Attention.step`).
- `norm.cpp`: RMSNorm, LayerNorm, the SiLU gate, GELU and the layer-scaled residual of a
  few rows, fused.
- `conv.cpp`: the input window of a streaming conv, through the SEANet's ELU, in one pass
  (see `moshi_core.nn.conv.CausalConv.step`).
- `layers.cpp`: a streaming step through a whole stack of Mimi's transformer layers.
- `rvq.cpp`: the codes of a residual vector quantizer for a few rows, cdist's own choice
  from a float16 pass over the centroids (see `moshi_core.nn.rvq`).
"""

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
NAME = "moshi_core_kernels"
# common.h first: the sources are one translation unit.
SOURCES = ("common.h", "linear.cpp", "attention.cpp", "norm.cpp", "conv.cpp", "layers.cpp", "rvq.cpp")
FUNCTIONS = ["skinny_linear", "q8_tiles_linear", "q8_int8_instructions", "q8_use_int8_instructions", "quantize_q8_0",
             "attention_step", "rms_norm", "silu_mul", "layer_norm", "gelu", "add_scaled",
             "elu_window", "layers_step", "rvq_codes"]


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


def build_key() -> dict[str, object]:
    """Everything the binary depends on: the build command (paths included) and its inputs.
    Two environments that differ in any of it build in different folders, so neither
    rebuilds over the other, while an unchanged one always finds its build."""
    from torch.utils import cpp_extension

    compiler = shutil.which(cpp_extension.get_cxx_compiler()) or cpp_extension.get_cxx_compiler()
    compiler = os.path.realpath(compiler)
    # its size and time stand for its version (an upgrade replaces the file), without running it
    stat = os.stat(compiler) if os.path.exists(compiler) else None
    return {
        "sources": [hashlib.sha256((CSRC / name).read_bytes()).hexdigest() for name in SOURCES],
        "functions": FUNCTIONS, "cflags": CFLAGS, "ldflags": LDFLAGS,
        "torch": [torch.__version__, str(Path(torch.__file__).resolve().parent)],
        "include": cpp_extension.include_paths(), "lib": cpp_extension.library_paths(),
        "python": [sys.version, sys.prefix, os.path.realpath(sys.executable)],
        "compiler": [compiler, stat and stat.st_size, stat and stat.st_mtime_ns],
    }


def build_directory() -> Path:
    """Where the extension is built and cached: under `TORCH_EXTENSIONS_DIR` (else PyTorch's
    default root), in a folder named by the Python and torch versions and a hash of
    `build_key()`."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '-')}"
    digest = hashlib.sha256(json.dumps(build_key(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"{NAME}-{tag}-{digest}"


def is_built() -> bool:
    """Whether this environment's build is already in `build_directory()`."""
    return (build_directory() / f"{NAME}.so").is_file()


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
            # copies: PyTorch appends to the lists it is given, and these are the build key's
            return load_inline(NAME, cpp_sources=sources, functions=list(FUNCTIONS), extra_cflags=list(CFLAGS),
                               extra_ldflags=list(LDFLAGS), build_directory=str(folder), verbose=False)
    except Exception as exc:  # any build problem means: use the portable path
        log.warning("CPU kernels unavailable (%s); using the portable path", exc)
        return None


def kernel_for(x: torch.Tensor):
    """The extension to run on `x`, or None (not on a CPU, turned off, or not buildable)."""
    if not ENABLED or x.device.type != "cpu":
        return None
    return kernels()
