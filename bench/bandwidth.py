"""This machine's memory read bandwidth: the floor every benchmark's "bound" divides by.

    python bench/bandwidth.py [--gib 2] [--repeats 5]

A plain streaming read, not a matrix product (ours or PyTorch's): a step bound by its weight
reads cannot beat reading the same bytes with nothing else to do, so the bound holds our
kernels to the hardware, not to themselves. `--gib` of memory (at least 1, well past the
caches) is read with each of a few reductions on every torch thread; the fastest reduction's
best run is the figure, since a reduction that cannot keep up with memory under-states it.
"""

import argparse
import time
from typing import NamedTuple

import torch

MIN_GIB = 1
# Reductions PyTorch vectorises and spreads over its threads; which is fastest depends on the
# CPU (a float sum adds, a max only compares; row sums split the work without a final merge).
READS = {
    "float32 sum": lambda x: x.view(torch.float32).sum(),
    "float32 max": lambda x: x.view(torch.float32).amax(),
    "int64 max": lambda x: x.view(torch.int64).amax(),
    "float32 row sums": lambda x: x.view(torch.float32).view(-1, 4096).sum(-1),
}


class ReadBandwidth(NamedTuple):
    bytes_per_second: float
    read: str  # the reduction that read fastest
    threads: int

    def __str__(self) -> str:
        return f"{self.bytes_per_second / 1e9:.1f} GB/s ({self.read}, {self.threads} threads)"


def read_bandwidth(gib: float = 2, repeats: int = 5) -> ReadBandwidth:
    """The best bytes/s of `repeats` reads of `gib` GiB, over the reductions of READS."""
    if gib < MIN_GIB:
        raise ValueError(f"read at least {MIN_GIB} GiB, or the caches flatter the figure")
    nbytes = int(gib * 2**30) // 2**15 * 2**15  # whole rows of 4096 float32
    data = torch.ones(nbytes, dtype=torch.uint8)  # ones: every page is touched before timing
    best, best_read = 0.0, ""
    with torch.no_grad():
        for name, read in READS.items():
            read(data)  # warm up the op's threads
            for _ in range(repeats):
                start = time.perf_counter()
                read(data)
                rate = nbytes / (time.perf_counter() - start)
                if rate > best:
                    best, best_read = rate, name
    return ReadBandwidth(best, best_read, torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2, help="GiB read per run (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per reduction (default: 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(read_bandwidth(args.gib, args.repeats))


if __name__ == "__main__":
    main()
