"""What a benchmark ran on: the CPU, the instructions that decide which kernels can run, torch,
its threads, and which of our kernels ran. Printed at the head of every table, so that figures
from two machines are never compared blind."""

import os
import platform

import torch

# The instructions our kernels (or PyTorch's) choose between: AVX2/FMA/F16C for the float and
# int8-widening paths, the VNNI families for int8 dot products, AVX-512 BF16 for bfloat16.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return {flag: flag in present for flag in FLAGS}
    except OSError:
        pass
    return {}


def kernels_ran() -> str:
    """Whether our CPU extension is built and on (building it first if needed, as a model's
    first matrix product would), and how its Q8_0 products multiply."""
    from moshi_core.kernels import build, q8

    if not build.ENABLED:
        return "our CPU kernels: off (portable PyTorch path)"
    extension = build.kernels()
    if extension is None:
        return "our CPU kernels: unavailable (portable PyTorch path; see the log for why)"
    if q8.INT8_ACTIVATIONS:
        products = f"int8 dot products on {extension.q8_int8_instructions()}"
    else:
        products = "float activations (strict)"
    return f"our CPU kernels: built (AVX2 FMA F16C); Q8_0 products: {products}"


def describe() -> dict:
    """The machine line's parts, for bench/results/latest.json."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "flags": [f for f, present in flags.items() if present],
        "missing_flags": [f for f, present in flags.items() if not present], "torch": torch.__version__,
        "threads": torch.get_num_threads(), "kernels": kernels_ran(),
    }


def machine_line(info: dict | None = None) -> str:
    info = info or describe()
    missing = f"; lacks {' '.join(info['missing_flags'])}" if info["missing_flags"] else ""
    flags = " ".join(info["flags"]) or "none of the listed flags"
    return (f"{info['cpu']}, {info['cpus']} CPUs; has {flags}{missing}; "
            f"torch {info['torch']}, {info['threads']} threads; {info['kernels']}")


if __name__ == "__main__":
    print(machine_line())
