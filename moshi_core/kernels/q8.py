"""8-bit weights kept int8 in memory: GGUF's Q8_0 (Kyutai's Candle q8) and bitsandbytes'
row-wise int8 (Kyutai's `*-pytorch-q8`).

Q8_0 (GGUF's 8-bit format) stores a matrix [out, in] as int8 values with one float16 scale
per block of 32 along `in`. Stock PyTorch has no matmul for per-block scales: its int8
weight-only op takes one scale per row, and requantizing to that would change the weights.
So on CPUs a Q8_0 matrix is laid out at load in the tiles our kernel reads as one stream
(`Q8Tiles`, a `TiledQ8Weight`; `csrc/linear.cpp`, "Q8_0 tiles"), which computes y = x W^T
in one of two arithmetics (`set_int8_activations`):

- int8 (the default): each activation row is quantized to Q8_0 too (per block of 32, d = max|x| / 127, as
  GGUF runtimes such as llama.cpp and Candle do), and a block's product is an int8 dot
  product in int32, scaled by both blocks' scales and summed in float32, block after block.
  The weight work is shared by the rows of a batch, and it adds the activations' rounding
  (half a step of max|x| / 127 per block: logits of a small LM move by 2-3% of their scale;
  greedy tokens agree with the float path as often as Q8_0 weights agree with unquantized ones).
- float ("strict"): the exact int8 weights times the float activations, in float32, times
  the scales: the dequantized model's numbers, to float32 summation order. Parity tests use it.

Where the kernel cannot be built (or is turned off), the weights are dequantized a slab of
rows at a time (the float arithmetic).

Row-wise int8 (`W = CB * SCB / 127`, one float32 scale per row) maps onto PyTorch's own
int8 weight-only matmul, `torch._weight_int8pack_mm`.

On CUDA, Q8_0 stays row-major (`Q8Weight`) and both formats run our Triton kernel
(`moshi_core.kernels.triton_q8`), which reads each int8 weight and its scale once and
multiplies in float (x's dtype into float32: the float arithmetic, whatever
`set_int8_activations` says). Each product is one torch custom op (`moshi::q8_tiles_linear`,
`moshi::q8_linear`, `moshi::int8_rows_linear`) with a fake implementation, so a compiled
step traces it as one node without a graph break. Where a GPU has memory to spare,
`set_gpu_q8("dequantize")` holds the weights in the model's float dtype instead.

A `QuantizedWeight` stands where a layer's float weight was. It implements
`__torch_function__`, so `F.linear` and `F.embedding` on it reach these kernels while the
model code stays unchanged.
"""

import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from moshi_core.kernels.build import kernel_for

log = logging.getLogger(__name__)
Q8_BLOCK = 32
TILE = 16  # rows per tile of the CPU layout (`Q8Tiles`)

# How Q8_0 weights multiply on the CPU kernel (see above); a plain module flag, read on every product.
INT8_ACTIVATIONS = True


def set_int8_activations(flag: bool) -> None:
    """Quantize activations and multiply in int8 (True, the default), or (False) the strict float path."""
    global INT8_ACTIVATIONS
    INT8_ACTIVATIONS = flag


# What 8-bit checkpoints become on a CUDA device (`set_gpu_q8`), read by `attach_int8_weights`.
GPU_Q8: Literal["int8", "dequantize"] = "int8"
# "dequantize" keeps this share of the GPU's memory free (KV caches, activations, Mimi): weights
# that would eat into it stay int8.
GPU_RESERVE = 0.25


def set_gpu_q8(mode: Literal["int8", "dequantize"]) -> None:
    """On CUDA, keep 8-bit weights int8 (the default: the Triton kernel, a quarter of bfloat16's
    memory) or "dequantize" them at load to the model's float dtype while the GPU has room
    beyond `GPU_RESERVE` (float matmuls; weights past that point stay int8). Applies to models
    loaded afterwards; CPUs always keep int8."""
    if mode not in ("int8", "dequantize"):
        raise ValueError(f"GPU 8-bit mode must be 'int8' or 'dequantize', not {mode!r}")
    global GPU_Q8
    GPU_Q8 = mode


@dataclass
class Q8Tensor:
    """A Q8_0 matrix [out, in]: int8 values and one float16 scale per 32 along `in`."""

    qs: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float16 [out, in / 32]

    @property
    def shape(self) -> torch.Size:
        return self.qs.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact in float32: int8 x float16 products fit float32's mantissa."""
        return _dequantize_rows(self.qs, self.scales).to(dtype)

    @staticmethod
    def cat(parts: list["Q8Tensor"]) -> "Q8Tensor":
        return Q8Tensor(torch.cat([p.qs for p in parts]), torch.cat([p.scales for p in parts]))


def _dequantize_rows(qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    *lead, cols = qs.shape
    blocks = qs.reshape(*lead, cols // Q8_BLOCK, Q8_BLOCK).float() * scales.float()[..., None]
    return blocks.reshape(*lead, cols)


@dataclass
class Q8Tiles:
    """A Q8_0 matrix of `rows` rows in the CPU kernel's tiles of 16 rows (`csrc/linear.cpp`,
    "Q8_0 tiles"): `tiles` int8 [T, in / 32, 512], where byte 64 g + 4 r + j of a tile's block
    is byte 4 g + j of row r's block, and `scales` float16 [T, in / 32, 16]; the last tile is
    padded with zero rows."""

    tiles: torch.Tensor
    scales: torch.Tensor
    rows: int

    @staticmethod
    def of(q8: Q8Tensor) -> "Q8Tiles":
        """The tiles of a row-major Q8_0 matrix (one copy of it)."""
        rows, cols = q8.shape
        pad = -rows % TILE
        qs = torch.cat([q8.qs, q8.qs.new_zeros(pad, cols)]) if pad else q8.qs
        scales = torch.cat([q8.scales, q8.scales.new_zeros(pad, cols // Q8_BLOCK)]) if pad else q8.scales
        count, blocks = (rows + pad) // TILE, cols // Q8_BLOCK
        lanes = _lanes(qs.contiguous()).reshape(count, TILE, blocks, 8).permute(0, 2, 3, 1).contiguous()
        tiles = lanes.view(torch.int8).reshape(count, blocks, 8 * TILE * 4)
        return Q8Tiles(tiles, scales.reshape(count, TILE, blocks).transpose(1, 2).contiguous(), rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.rows, self.tiles.shape[1] * Q8_BLOCK])

    def gather(self, rows: torch.Tensor) -> Q8Tensor:
        """Rows `rows` (any shape of indices), row-major: [*rows.shape, in]."""
        count, blocks, _ = self.tiles.shape
        tile, lane = rows // TILE, rows % TILE
        lanes = _lanes(self.tiles).view(count, blocks, 8, TILE)[tile, :, :, lane]  # [*rows, blocks, 8]
        return Q8Tensor(lanes.view(torch.int8).reshape(*rows.shape, -1), self.scales[tile, :, lane])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.untiled().dequantize(dtype)

    def untiled(self) -> Q8Tensor:
        """The row-major matrix again (a copy)."""
        count, blocks, _ = self.tiles.shape
        lanes = _lanes(self.tiles).view(count, blocks, 8, TILE).permute(0, 3, 1, 2).contiguous()
        qs = lanes.view(torch.int8).reshape(count * TILE, -1)
        scales = self.scales.transpose(1, 2).reshape(count * TILE, blocks)
        return Q8Tensor(qs[: self.rows], scales[: self.rows])

    def slabs(self, tiles: int = 64):
        """The matrix as row-major slabs of `tiles` tiles, in order."""
        for i in range(0, self.tiles.shape[0], tiles):
            part = Q8Tiles(self.tiles[i : i + tiles], self.scales[i : i + tiles], min(self.rows - i * TILE, tiles * TILE))
            yield part.untiled()


def _lanes(qs: torch.Tensor) -> torch.Tensor:
    """Four consecutive int8 weights as one int32 (a tile lane), so layout copies move lanes, not bytes."""
    return qs.view(torch.int32)


@dataclass
class Int8Rows:
    """bitsandbytes' row-wise int8: `CB` [out, in] and float32 `SCB` [out]; W = CB * SCB / 127."""

    cb: torch.Tensor
    scb: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.cb.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.cb.float() * (self.scb.float() / 127)[:, None]).to(dtype)


class QuantizedWeight:
    """Shared behaviour of int8 weights in place of float parameters, computing in `dtype`.

    Subclasses are dataclass-like: their fields (tensors with one row, or tile, per output;
    then plain values) are given to the constructor in order, followed by `dtype`.
    """

    dtype: torch.dtype
    shape: torch.Size

    def __init__(self, *tensors: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(*tensors)
        self.dtype = dtype

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(v for v in (getattr(self, f) for f in self.__dataclass_fields__) if isinstance(v, torch.Tensor))

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    @property
    def nbytes(self) -> int:
        """The bytes a product reads."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def __getitem__(self, rows: slice) -> "QuantizedWeight":
        if not isinstance(rows, slice):
            raise TypeError("an 8-bit weight can only be sliced by rows")
        return type(self)(*(t[rows] for t in self._tensors()), dtype=self.dtype)

    def new_zeros(self, *shape, **kwargs) -> torch.Tensor:
        kwargs.setdefault("dtype", self.dtype)
        kwargs.setdefault("device", self.device)
        return torch.zeros(*shape, **kwargs)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ Wᵀ -> [M, O], in x's dtype."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, self, bias)` for x [..., K], in x's dtype."""
        y = self.linear(x.reshape(-1, x.shape[-1]))
        return (y if bias is None else y + bias).view(*x.shape[:-1], -1)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return args[1](args[0], args[2] if len(args) > 2 else kwargs.get("bias"))
        if func is F.embedding:
            return args[1].embedding(args[0])
        raise TypeError(f"{func.__name__} is not supported on 8-bit weights")


class Q8Weight(QuantizedWeight, Q8Tensor):
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return q8_linear(x, self.qs, self.scales)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return _dequantize_rows(self.qs[tokens], self.scales[tokens]).to(self.dtype)


class TiledQ8Weight(QuantizedWeight, Q8Tiles):
    """Q8_0 on the CPU, in the kernel's tiles."""

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return q8_tiles_linear(x, self.tiles, self.scales, self.rows, INT8_ACTIVATIONS)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.gather(tokens)
        return _dequantize_rows(rows.qs, rows.scales).to(self.dtype)

    def __getitem__(self, rows: slice) -> "TiledQ8Weight":
        """Rows `start:stop`: a view where they are whole tiles (every cut Kyutai's dimensions
        make: the depth transformer's per-step weights, attention's projections), else a copy."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("an 8-bit weight can only be sliced by a range of rows")
        start, stop, _ = rows.indices(self.rows)
        if start % TILE == 0 and (stop % TILE == 0 or stop == self.rows) and start < stop:
            first, last = start // TILE, -(-stop // TILE)
            return TiledQ8Weight(self.tiles[first:last], self.scales[first:last], stop - start, dtype=self.dtype)
        whole = self.untiled()
        part = Q8Tiles.of(Q8Tensor(whole.qs[start:stop], whole.scales[start:stop]))
        return TiledQ8Weight(part.tiles, part.scales, part.rows, dtype=self.dtype)


class Int8RowWeight(QuantizedWeight, Int8Rows):
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return int8_rows_linear(x, self.cb, self.scb)


# The products as custom ops: opaque to torch.compile (their fake implementations give the
# shapes), dispatched by device. All return [M, N] in x's dtype.

@torch.library.custom_op("moshi::q8_tiles_linear", mutates_args=())
def q8_tiles_linear(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, rows: int,
                    int8_activations: bool) -> torch.Tensor:
    """x [M, K] @ Wᵀ for a Q8_0 W of `rows` rows in tiles (`Q8Tiles`): our C++ kernel, else
    dequantized slabs."""
    kernel = kernel_for(x)
    if kernel is not None:
        return kernel.q8_tiles_linear(x, tiles, scales, rows, int8_activations)
    return _slab_matmul(x, Q8Tiles(tiles, scales, rows).slabs()).to(x.dtype)


@torch.library.custom_op("moshi::q8_linear", mutates_args=())
def q8_linear(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ Wᵀ for a row-major Q8_0 W (int8 `qs` [N, K], float16 `scales` [N, K / 32]) in
    the float arithmetic; off CUDA, or without Triton: dequantized slabs."""
    return _q8_portable(x, qs, scales)


@torch.library.custom_op("moshi::int8_rows_linear", mutates_args=())
def int8_rows_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ Wᵀ for a row-wise int8 W (int8 `cb` [N, K], float32 `scb` [N]), off CUDA."""
    return _int8_rows_portable(x, cb, scb)


@q8_linear.register_kernel("cuda")
def _q8_linear_cuda(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    matmul = _triton_matmul()
    return matmul(x, qs, scales) if matmul else _q8_portable(x, qs, scales)


@int8_rows_linear.register_kernel("cuda")
def _int8_rows_linear_cuda(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    matmul = _triton_matmul()
    return matmul(x, cb, scb) if matmul else _int8_rows_portable(x, cb, scb)


@q8_tiles_linear.register_fake
def _q8_tiles_linear_fake(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, rows: int,
                          int8_activations: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], rows)


@q8_linear.register_fake
def _q8_linear_fake(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qs.shape[0])


@int8_rows_linear.register_fake
def _int8_rows_linear_fake(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], cb.shape[0])


@functools.cache
def _triton_matmul():
    """The Triton kernel, imported on first CUDA use (so nothing imports triton on CPUs), or None
    where triton is missing (CUDA builds of torch for Linux bring it)."""
    try:
        from moshi_core.kernels.triton_q8 import int8_matmul
    except ImportError as exc:
        log.warning("triton unavailable (%s): 8-bit products on the GPU take the portable path", exc)
        return None
    return int8_matmul


def _q8_portable(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, slab: int = 1024) -> torch.Tensor:
    slabs = (Q8Tensor(qs[i : i + slab], scales[i : i + slab]) for i in range(0, qs.shape[0], slab))
    return _slab_matmul(x, slabs).to(x.dtype)


def _int8_rows_portable(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    # Scales in float32 with float32 activations: bfloat16 scales would round every row.
    return torch._weight_int8pack_mm(x.float(), cb, scb.float() / 127).to(x.dtype)


def _slab_matmul(x: torch.Tensor, slabs) -> torch.Tensor:
    """The fallback: x against each row-major slab of the matrix dequantized in turn, so no full
    float copy is ever made."""
    x = x.float()
    return torch.cat([F.linear(x, slab.dequantize()) for slab in slabs], dim=-1)


def attach_int8_weights(
    model: torch.nn.Module, state: dict, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Put an 8-bit weight (on `device`) in place of every parameter that `state` holds in
    8 bits, on a model still on the meta device, so no float copy is ever allocated. Returns
    the rest of the state, the tensors to load as usual. With `set_gpu_q8("dequantize")` on
    CUDA, weights go in as plain `dtype` tensors instead while the GPU has room."""
    rest = {}
    for name, value in state.items():
        if isinstance(value, (Q8Tensor, Int8Rows)) and _dequantizes(value.shape, dtype, device):
            # on the device, so the host never holds a float copy; a plain attribute like the
            # 8-bit weights (not a parameter: `to_empty` would wipe it)
            weight = type(value)(*(t.to(device) for t in vars(value).values())).dequantize(dtype)
        elif isinstance(value, Q8Tensor) and torch.device(device).type == "cpu":
            tiled = Q8Tiles.of(value)  # the CPU kernel's layout
            weight = TiledQ8Weight(tiled.tiles, tiled.scales, tiled.rows, dtype=dtype)
        elif isinstance(value, Q8Tensor):  # row-major: Triton's layout
            weight = Q8Weight(
                value.qs.to(device).contiguous(), value.scales.to(device).contiguous(), dtype=dtype
            )
        elif isinstance(value, Int8Rows):
            weight = Int8RowWeight(
                value.cb.to(device).contiguous(), value.scb.to(device).float().contiguous(), dtype=dtype
            )
        else:
            rest[name] = value
            continue
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        del module._parameters[attr]
        setattr(module, attr, weight)
    return rest


def _dequantizes(shape: torch.Size, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether an 8-bit matrix of `shape` goes onto `device` as a float `dtype` one (`set_gpu_q8`)."""
    return GPU_Q8 == "dequantize" and torch.device(device).type == "cuda" and _has_room(shape, dtype, device)


def _has_room(shape: torch.Size, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a `dtype` matrix of `shape` fits on the CUDA `device` beyond `GPU_RESERVE` of its memory."""
    free, total = torch.cuda.mem_get_info(device)
    return free - shape.numel() * dtype.itemsize >= GPU_RESERVE * total


def join_row_scales(state: dict[str, torch.Tensor]) -> dict:
    """bitsandbytes files store `X` (int8) beside `X_scb` (float32 per-row scales): pair them."""
    joined: dict = {}
    for name, value in state.items():
        if name.endswith("_scb"):
            continue
        scb = state.get(name + "_scb")
        joined[name] = value if scb is None else Int8Rows(value, scb)
    return joined
