"""The floor under every figure of `bench/gpu.py`: the bytes a step reads over the device's
measured read bandwidth.

The bandwidth is `bench/bandwidth.py`'s idea on the device the model runs on: a plain
streaming read of a buffer far larger than any cache, by a few reductions, best of several
runs, never a matrix product (a bound measured with our own kernels would only hold them
to themselves). On the CPU it is `bench/bandwidth.py`'s own read.
"""

from dataclasses import dataclass

import torch
from bandwidth import MIN_GIB, READS, read_bandwidth


@dataclass(frozen=True)
class DeviceBandwidth:
    bytes_per_second: float
    read: str  # the reduction that read fastest
    gib: float  # the size of the buffer read
    repeats: int

    def __str__(self) -> str:
        return (f"{self.bytes_per_second / 1e9:.1f} GB/s ({self.read} of {self.gib:g} GiB, "
                f"best of {self.repeats})")

    def bound(self, nbytes: int) -> float:
        """Seconds to read `nbytes` once at this bandwidth."""
        return nbytes / self.bytes_per_second


def device_read_bandwidth(device: torch.device, gib: float = 4, repeats: int = 5) -> DeviceBandwidth:
    """The best bytes/s of `repeats` streaming reads of `gib` GiB on `device`, over READS."""
    if device.type != "cuda":
        measured = read_bandwidth(max(gib, MIN_GIB), repeats)
        return DeviceBandwidth(measured.bytes_per_second, measured.read, max(gib, MIN_GIB), repeats)
    nbytes = int(gib * 2**30) // 2**15 * 2**15  # whole rows of 4096 float32
    data = torch.ones(nbytes, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best, best_read = 0.0, ""
    with torch.no_grad():
        for name, read in READS.items():
            read(data)  # the first call pays for the kernel's load
            for _ in range(repeats):
                start.record()
                read(data)
                end.record()
                end.synchronize()
                rate = nbytes / (start.elapsed_time(end) / 1000)
                if rate > best:
                    best, best_read = rate, name
    del data
    torch.cuda.empty_cache()
    return DeviceBandwidth(best, best_read, gib, repeats)


def tensors(*objects):
    """The distinct tensors reachable from `objects` (a step's state: dataclasses, lists, dicts
    of tensors), each once."""
    seen: set[int] = set()
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            stack.extend(vars(obj).values())


def tensor_bytes(*objects) -> int:
    """Bytes of the storage under `tensors(*objects)`, each storage once. A static-shape step
    reads all of its state every time: attention reads every KV entry, masked or not."""
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors(*objects)}
    return sum(storages.values())
