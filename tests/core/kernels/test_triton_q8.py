"""The GPU's 8-bit kernel (`moshi_core.kernels.triton_q8`) on CPU tensors, under Triton's
interpreter, against the float64 product of the dequantized weights: Q8_0 and row-wise int8,
odd sizes, 1 to 70 rows, bfloat16 and float32 activations, K split or not.

`TRITON_INTERPRET=1` must be set before triton is imported, and this process's other tests
compile with torch (whose inductor imports triton too): so the kernel runs in a child process,
this very file run as a script, which prints one JSON line per case.

Tolerance, per output: the kernel sums exact products in float32, scaled per block (Q8_0) or
per row, so its error is within 2K float32 roundings of the sum of |x| |w| (the standard bound
for a float32 dot of length K, doubled for the scalings), plus one rounding of the output to
its dtype (the interpreter may truncate bfloat16 rather than round: a whole ulp, 2^-7 relative).

The interpreter runs the dots in float32 (it miscomputes bfloat16 ones), so the GPU's own
code is checked apart: compiled ahead for sm_89 and sm_90, it must multiply on tensor cores.
What none of this measures is the kernel's speed on a GPU.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

# Looked up, not imported: this process must not import triton on the interpreter's terms.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# (layout, rows M, outputs N, inner K, activations, split_k or None for the heuristic)
# Each size at one row and at a partial row tile in the fast subset; the other row counts
# (a whole 64-row tile, 2 and 3 rows) with the 7B widths in the full suite.
SIZES = ((100, 32), (257, 96), (100, 1024))
FAST_CASES = [
    (layout, m, n, k, dtype, None)
    for layout in ("q8_0", "rows")
    for n, k in SIZES
    for m in (1, 16)
    for dtype in ("bfloat16", "float32")
] + [
    ("rows", 3, 100, 37, "float32", None),  # row-wise takes any K
    ("rows", 16, 257, 1029, "bfloat16", None),
    ("q8_0", 70, 65, 256, "float32", None),  # more than 64 rows: two row tiles
    ("q8_0", 2, 257, 1024, "float32", 3),  # K split unevenly over programs, partials summed
    ("rows", 5, 100, 1029, "bfloat16", 2),
    ("q8_0", 1, 33, 96, "float16", None),
]
SLOW_CASES = [
    (layout, m, 257, 4096, dtype, split)
    for layout in ("q8_0", "rows")
    for m, dtype, split in ((1, "bfloat16", None), (16, "float32", 4), (64, "bfloat16", None))
] + [
    (layout, m, n, k, dtype, None)
    for layout in ("q8_0", "rows")
    for n, k in SIZES
    for m in (2, 3, 64)
    for dtype in ("bfloat16", "float32")
]
OUTPUT_ULP = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def _case_id(case: tuple) -> str:
    layout, m, n, k, dtype, split = case
    return f"{layout}-M{m}-N{n}-K{k}-{dtype}" + (f"-split{split}" if split else "")


def _run_interpreted(cases: list[tuple]) -> dict[str, dict]:
    """Run `cases` in a child process under the interpreter; {case id: its result}."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}


@pytest.fixture(scope="module")
def fast_results() -> dict[str, dict]:
    return _run_interpreted(FAST_CASES + [("q8_0", 2, 10, 48, "float32", None)])


@pytest.fixture(scope="module")
def slow_results() -> dict[str, dict]:
    return _run_interpreted(SLOW_CASES)


def _check(result: dict) -> None:
    assert result["shape"] == result["expected_shape"] and result["dtype"] == result["expected_dtype"]
    assert result["worst"] <= 1.0, f"error {result['worst']:.3g} x the tolerance"


@pytest.mark.parametrize("case", FAST_CASES, ids=_case_id)
def test_kernel_equals_dequantized_product(fast_results, case):
    _check(fast_results[_case_id(case)])


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=_case_id)
def test_kernel_equals_dequantized_product_at_7b_width_and_more_row_counts(slow_results, case):
    _check(slow_results[_case_id(case)])


def test_q8_0_refuses_k_off_its_blocks(fast_results):
    assert "multiple of 32" in fast_results[_case_id(("q8_0", 2, 10, 48, "float32", None))]["error"]


# Compiled ahead for real GPUs (no device needed: Triton's own ptxas): the L4 the Space asks for
# (sm_89) and H100/H200 (sm_90), bfloat16 activations, as a streaming step runs.
@pytest.mark.parametrize("per_block,arch,block_m", [(True, 89, 16), (True, 90, 16), (False, 90, 64)],
                         ids=["q8_0-sm89", "q8_0-sm90", "rows-sm90-64rows"])
def test_kernel_compiles_for_gpus_on_tensor_cores(per_block, arch, block_m):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moshi_core.kernels import triton_q8

    pointers = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp16" if per_block else "*fp32", "y_ptr": "*bf16"}
    ints = ("M", "N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_sn", "stride_ys", "stride_ym")
    constants = {"PER_BLOCK": per_block, "DOT_DTYPE": tl.bfloat16, "BLOCK_M": block_m, "BLOCK_N": triton_q8.BLOCK_N,
                 "BLOCK_K": triton_q8.BLOCK_K, "SUB_K": triton_q8.Q8_BLOCK}
    signature = {**pointers, **dict.fromkeys(ints, "i32"), **dict.fromkeys(constants, "constexpr")}
    source = ASTSource(triton_q8._int8_matmul, signature, constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
    # tensor-core products of bfloat16 into float32: Ampere-style mma (any M tile), or Hopper's wgmma (M tiles of 64)
    assert re.search(r"(mma\.sync\.aligned\.m16n8k16\.row\.col|wgmma\.mma_async\.sync\.aligned\.m64n\d+k16)"
                     r"\.f32\.bf16\.bf16", ptx)


def _child(cases: list[list]) -> None:
    """In the interpreted child: one JSON line per case."""
    import torch

    from moshi_core.kernels.triton_q8 import int8_matmul

    for case in cases:
        layout, m, n, k, dtype, split = case
        g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
        values = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)  # -128 too: a file may hold it
        x = (torch.randn(m, k, generator=g) * 4).to(getattr(torch, dtype))
        if layout == "q8_0":
            scales = (torch.rand(n, max(1, k // 32), generator=g) * 0.02).half()
            w = (values.double().reshape(n, -1, 32) * scales.double()[..., None]).reshape(n, k) if k % 32 == 0 else None
        else:
            scales = torch.rand(n, generator=g) * 3
            w = values.double() * (scales.double() / 127)[:, None]
        try:
            y = int8_matmul(x, values, scales, split_k=split)
        except ValueError as exc:
            print(json.dumps({"case": _case_id(case), "error": str(exc)}))
            continue
        exact = x.double() @ w.T
        tolerance = (x.double().abs() @ w.abs().T) * (2 * k * 2.0**-24) + exact.abs() * OUTPUT_ULP[dtype] + 1e-30
        print(json.dumps({
            "case": _case_id(case), "worst": ((y.double() - exact).abs() / tolerance).max().item(),
            "shape": list(y.shape), "expected_shape": [m, n], "dtype": str(y.dtype), "expected_dtype": str(x.dtype),
        }))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
