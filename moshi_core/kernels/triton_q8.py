"""y = x Wᵀ on the GPU straight from 8-bit weights: one Triton kernel for Q8_0 and for
bitsandbytes' row-wise int8 (see `moshi_core.kernels.q8`).

Each program computes a [BLOCK_M, BLOCK_N] tile of y and walks its share of K in sub-blocks of
32 columns, one Q8_0 block: it loads the int8 tile [BLOCK_N, 32] and that block's BLOCK_N
scales once, multiplies the int8 values (exact in x's dtype) with tensor cores into float32,
and scales the block's product per column, which is the dequantized product without a float
copy of the weights ever leaving registers. Row-wise weights skip the per-block scale and
scale each column once at the end. So a step reads 1 byte per weight, not the 4 + 4 (write
and read back) of dequantizing to float32.

Tiles (chosen by reasoning, not yet tuned on a GPU):
- BLOCK_M: the rows rounded up to a power of two, at least 16 (the smallest tensor-core dot)
  and at most 64: up to 64 rows (a streaming step of 64 conversations) every weight is read
  exactly once; beyond, one more read of the int8 weights per 64 rows, still 1 byte a weight,
  so longer inputs (prefill) take the same kernel and no slab path is needed.
- BLOCK_N = 64 output columns: a float32 accumulator of at most 64 x 64 in registers.
- BLOCK_K = 128 (four Q8_0 blocks unrolled per iteration), so loads of the next blocks are in
  flight while the current one multiplies.
- SPLIT_K: a step has few rows, so y has few tiles (4096 outputs: 64 tiles) for a GPU's 100+
  SMs. K is split until there are about two programs per SM, each keeping at least four
  iterations; the partial products (float32, [SPLIT_K, M, N], small) are summed by torch in
  a fixed order, so results stay deterministic (no atomics).
Compiled for sm_90, the int8 and activation tiles stream in with 16- and 8-byte async copies, 3
stages deep; each scale is a 2-byte load whose neighbours (the row's next blocks) the L1 cache
serves. The first things to tune on a GPU: BLOCK_N, num_warps and the SPLIT_K target.

Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is imported) runs the same
kernel on CPU tensors, which is how CI tests it.
"""

import functools

import torch
import triton
import triton.language as tl

Q8_BLOCK = 32  # GGUF's Q8_0 block; kept literal here so the kernel's sub-block is plainly the format's
BLOCK_N = 64
BLOCK_K = 128
MAX_BLOCK_M = 64
MIN_K_ITERATIONS = 4  # per split: below this, splitting K costs more in partials than it gains
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _int8_matmul(
    x_ptr, w_ptr, s_ptr, y_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
    PER_BLOCK: tl.constexpr,  # True: Q8_0, a float16 scale per 32 along K; False: row-wise, float32 SCB per row
    DOT_DTYPE: tl.constexpr,  # x's dtype on a GPU (tensor cores); float32 in the interpreter (see int8_matmul)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, SUB_K)
    m_ok = rm < M
    n_ok = rn < N
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB_K):
            k = k0 + j * SUB_K + rk
            k_ok = k < k_end
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            # int8 values are exact in bfloat16, float16 and float32 (through float32: the interpreter turns
            # int8 straight to bfloat16 into NaN); "ieee": no TF32 rounding of float32 x
            w = w.to(tl.float32).to(DOT_DTYPE)
            part = tl.dot(x.to(DOT_DTYPE), tl.trans(w), input_precision="ieee")
            if PER_BLOCK:
                block = (k0 + j * SUB_K) // SUB_K
                s = tl.load(s_ptr + rn * stride_sn + block, mask=n_ok & (rn * 0 + block * SUB_K < k_end), other=0.0)
                acc += part * s.to(tl.float32)[None, :]
            else:
                acc += part
    if not PER_BLOCK:
        acc = acc * (tl.load(s_ptr + rn * stride_sn, mask=n_ok, other=0.0) / 127.0)[None, :]
    y = y_ptr + tl.program_id(2) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM keep a memory-bound product streaming; 1 where no CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(device: torch.device, tiles: int, k: int) -> int:
    k_iterations = triton.cdiv(k, BLOCK_K)
    return max(1, min(_programs_wanted(device) // tiles, k_iterations // MIN_K_ITERATIONS))


def int8_matmul(
    x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, split_k: int | None = None
) -> torch.Tensor:
    """x [M, K] (float32, bfloat16 or float16) @ Wᵀ -> [M, N] in x's dtype, W given as int8 `values`
    [N, K] and either float16 Q8_0 `scales` [N, K / 32] or float32 row-wise SCB [N] (W = CB * SCB / 127).
    `split_k`: how many programs share K (default: a heuristic for the GPU at hand)."""
    per_block = scales.dim() == 2
    (m, k), n = x.shape, values.shape[0]
    if x.dtype not in _DOT_DTYPES:
        raise TypeError(f"8-bit products take float32, bfloat16 or float16 activations, not {x.dtype}")
    if values.shape[1] != k or values.dtype != torch.int8 or values.stride(1) != 1:
        raise ValueError(f"weights must be int8 [N, {k}] with contiguous rows, not {values.dtype} {list(values.shape)}")
    if per_block and (k % Q8_BLOCK or scales.shape != (n, k // Q8_BLOCK) or scales.stride(1) != 1):
        raise ValueError(f"Q8_0 needs K a multiple of {Q8_BLOCK} and scales [N, K / {Q8_BLOCK}]: "
                         f"K = {k}, scales {list(scales.shape)}")
    if not per_block and scales.shape != (n,):
        raise ValueError(f"row-wise int8 needs one scale per row: scales {list(scales.shape)} for {n} rows")
    if m == 0 or k == 0:  # nothing to launch
        return x.new_zeros(m, n)
    x = x.contiguous()
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))
    tiles_m, tiles_n = triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N)
    split = split_k or _split_k(x.device, tiles_m * tiles_n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
    split = triton.cdiv(k, k_per_split)  # no empty splits
    y = torch.empty((split, m, n), device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    _int8_matmul[(tiles_m, tiles_n, split)](
        x, values, scales, y, m, n, k, k_per_split,
        x.stride(0), values.stride(0), scales.stride(0), y.stride(0), y.stride(1),
        # Triton 3.9's interpreter (CPU tensors) miscomputes bfloat16 dots; float32 holds the same exact
        # products, so it changes only the summation's rounding.
        PER_BLOCK=per_block, DOT_DTYPE=_DOT_DTYPES[x.dtype] if x.is_cuda else tl.float32,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SUB_K=Q8_BLOCK,
    )
    return y[0] if split == 1 else y.sum(0).to(x.dtype)
