"""8-bit weights kept int8 in memory: GGUF's Q8_0 (Kyutai's Candle q8) and bitsandbytes'
row-wise int8 (Kyutai's `*-pytorch-q8`).

Q8_0 (GGUF's 8-bit format) stores a matrix [out, in] as int8 values with one float16 scale
per block of 32 along `in`. Stock PyTorch has no matmul for per-block scales: its int8
weight-only op takes one scale per row, and requantizing to that would change the weights.
So our CPU kernel (`csrc/linear.cpp`) computes y = x W^T from the int8 values, in one of two
arithmetics (`set_int8_activations`):

- int8 (the default): each activation row is quantized to Q8_0 too (per block of 32, d = max|x| / 127, as
  GGUF runtimes such as llama.cpp and Candle do), and a block's product is an int8 dot
  product in int32, scaled by both blocks' scales and summed in float32. It reads the same
  weights with fewer instructions (1.0-1.2x faster on a 2-core AVX2 EPYC, where the weight
  read dominates; more where VNNI runs it), and adds the activations' rounding (half a step
  of max|x| / 127 per block: logits of a small LM move by 2-3% of their scale; greedy
  tokens agree with the float path as often as Q8_0 weights agree with unquantized ones).
- float ("strict"): the exact dequantized weights times the float activations, in float32:
  the dequantized model's numbers, to float32 summation order. Parity tests use it.

Where the kernel cannot be built, or on GPUs, the weights are dequantized a slab of rows at
a time (the float arithmetic).

Row-wise int8 (`W = CB * SCB / 127`, one float32 scale per row) maps onto PyTorch's own
int8 weight-only matmul, `torch._weight_int8pack_mm`.

A `QuantizedWeight` stands where a layer's float weight was. It implements
`__torch_function__`, so `F.linear` and `F.embedding` on it reach these kernels while the
model code stays unchanged.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moshi_core.kernels.build import kernel_for

Q8_BLOCK = 32

# How Q8_0 weights multiply on the CPU kernel (see above); a plain module flag, read on every product.
INT8_ACTIVATIONS = True


def set_int8_activations(flag: bool) -> None:
    """Quantize activations and multiply in int8 (True, the default), or (False) the strict float path."""
    global INT8_ACTIVATIONS
    INT8_ACTIVATIONS = flag


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

    Subclasses are dataclass-like: their fields are tensors with one row per output, given
    to the constructor in order, followed by `dtype`.
    """

    dtype: torch.dtype
    shape: torch.Size

    def __init__(self, *tensors: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(*tensors)
        self.dtype = dtype

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    def __getitem__(self, rows: slice) -> "QuantizedWeight":
        if not isinstance(rows, slice):
            raise TypeError("an 8-bit weight can only be sliced by rows")
        return type(self)(*(t[rows] for t in self._tensors()), dtype=self.dtype)

    def new_zeros(self, *shape, **kwargs) -> torch.Tensor:
        kwargs.setdefault("dtype", self.dtype)
        kwargs.setdefault("device", self.device)
        return torch.zeros(*shape, **kwargs)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ Wᵀ -> [M, O]."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, self, bias)` for x [..., K], in x's dtype."""
        y = self.linear(x.reshape(-1, x.shape[-1])).to(x.dtype)
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
        kernel = kernel_for(x)
        if kernel is not None:
            return kernel.q8_linear(x, self.qs, self.scales, INT8_ACTIVATIONS)
        return _slab_matmul(x, self)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return _dequantize_rows(self.qs[tokens], self.scales[tokens]).to(self.dtype)


class Int8RowWeight(QuantizedWeight, Int8Rows):
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # Scales in float32 with float32 activations: bfloat16 scales would round every row.
        return torch._weight_int8pack_mm(x.float(), self.cb, self.scb.float() / 127)


def _slab_matmul(x: torch.Tensor, weight: Q8Weight, slab: int = 1024) -> torch.Tensor:
    """Fallback: dequantize `slab` rows at a time, so no full float copy is ever made."""
    x = x.float()
    parts = [
        F.linear(x, _dequantize_rows(weight.qs[i : i + slab], weight.scales[i : i + slab]))
        for i in range(0, weight.qs.shape[0], slab)
    ]
    return torch.cat(parts, dim=-1)


def attach_int8_weights(
    model: torch.nn.Module, state: dict, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Put an 8-bit weight (on `device`) in place of every parameter that `state` holds in
    8 bits, on a model still on the meta device, so no float copy is ever allocated. Returns
    the rest of the state, the tensors to load as usual."""
    rest = {}
    for name, value in state.items():
        if isinstance(value, Q8Tensor):
            weight: QuantizedWeight = Q8Weight(
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


def join_row_scales(state: dict[str, torch.Tensor]) -> dict:
    """bitsandbytes files store `X` (int8) beside `X_scb` (float32 per-row scales): pair them."""
    joined: dict = {}
    for name, value in state.items():
        if name.endswith("_scb"):
            continue
        scb = state.get(name + "_scb")
        joined[name] = value if scb is None else Int8Rows(value, scb)
    return joined
