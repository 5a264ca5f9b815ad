"""One GPU benchmark of many real-time conversations: Moshi 7B and Mimi on one card.

    python bench/gpu.py [--batches 1,2,4,8,16,32,48,64,96] [--json bench/results/gpu.json]
    python bench/gpu.py --device cpu --smoke      # the same code paths, tiny, on the CPU

Random weights are made on the device (no files, nothing downloaded): the 7B LM from its
released config, each matrix the q8 GGUF holds in Q8_0 made in bfloat16 and quantized
there (int8 kept, as the default model loads); the bf16 rows use the same weights
dequantized. Mimi is the full-size model in float32, as Kyutai runs it. Measured:

- the LM step at one conversation, q8 and bf16, eager and compiled into CUDA graphs
  (`LMGenerator(gpu_step=...)`), p50/p95;
- for B conversations stepped together (lockstep, every slot active), the live engine's
  frame: Mimi encodes B frames, the LM steps, Mimi decodes; p50/p95 of the frame and of its
  parts (Mimi encode + decode alone is the "Mimi streaming" figure), the largest B whose
  p95 is within the 80 ms frame, and the device memory each B adds
  (`torch.cuda.max_memory_allocated` over what was held before);
- beside each figure its bound: the bytes the step reads (weights, with Q8_0 as int8 and
  float16 scales, not the embedding tables; plus the whole state, KV caches included, which
  a static-shape step reads every time) over the card's measured read bandwidth
  (`gpu_bound.py`).

Per-slot seeded sampling, as the live engine samples. Times come from CUDA events around
each part, with one host sync per frame (as a live server has, to send the audio). The first
`--warmup-steps` steps (compilation, graph capture) are left out and reported apart, with
`LMGenerator.warm_up`'s own time. The figures go to `--json` as they are measured, so a run
that is cut short keeps what it had; past `--time-limit` no new measurement starts. On the
CPU nothing is compiled (every mode runs eager).
"""

import argparse
import gc
import importlib.metadata
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from gpu_bound import DeviceBandwidth, device_read_bandwidth, tensor_bytes  # noqa: E402
from reads import mimi_bytes, step_bytes  # noqa: E402

from moshi_core.inference.generate import LMGenerator  # noqa: E402
from moshi_core.kernels.q8 import QuantizedWeight, attach_int8_weights, set_gpu_q8  # noqa: E402
from moshi_core.kernels.quantize import is_q8_matrix, quantize_q8_0  # noqa: E402
from moshi_core.models.lm import MOSHI_7B, LMConfig, LMModel  # noqa: E402
from moshi_core.models.mimi import MimiModel  # noqa: E402
from moshi_core.params import GPU_STEPS, SamplingParams, compile_mode  # noqa: E402

FRAME_SECONDS = 0.08
BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 96)
SMOKE_BATCHES = (1, 2)
DTYPES = ("q8", "bf16")  # in the order they are made: int8 first, then dequantized
MODES = ("eager", "cuda-graphs")
USER_STREAMS = 8  # Mimi codebooks the LM reads from the user
DEFAULT_JSON = ROOT / "bench" / "results" / "gpu.json"


@dataclass(frozen=True)
class Plan:
    """What one run measures (the command line's choices)."""

    device: torch.device
    smoke: bool
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    sweep_dtypes: tuple[str, ...]
    sweep_mode: str
    steps: int  # timed LM steps at one conversation
    frames: int  # timed frames per batch size
    warmup_steps: int
    time_limit: float  # seconds into the run after which no measurement starts
    seed: int


# -- models, made on the device -------------------------------------------------------------

def lm_config(smoke: bool):
    """The released 7B's config, or (smoke) its structure at a size a CPU steps in
    milliseconds (its 64 codes are the tiny Mimi's)."""
    if not smoke:
        return LMConfig.from_dict(MOSHI_7B)
    from oracle import REDUCED_7B

    return LMConfig.from_dict(REDUCED_7B)


def random_lm(smoke: bool, device: torch.device, seed: int) -> LMModel:
    """The LM on `device` with Q8_0 weights kept int8, as the default q8 GGUF loads: each matrix
    that file holds in Q8_0 (`is_q8_matrix`) is made there in bfloat16, quantized, and dropped,
    one at a time; the rest in bfloat16. Random values (timing does not depend on them): std
    1/sqrt(fan_in), norms at 1."""
    set_gpu_q8("int8")  # kept int8 on CUDA too, whatever MOSHI_GPU_Q8 said
    with torch.device("meta"):
        model = LMModel(lm_config(smoke)).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(seed)

    def fill(name: str, p: torch.Tensor) -> torch.Tensor:
        if p.dim() < 2 or name.endswith(".alpha"):
            return p.fill_(1.0)
        return p.normal_(0, p.shape[-1] ** -0.5, generator=generator)

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if is_q8_matrix(p):
                weight = fill(name, torch.empty(p.shape, dtype=p.dtype, device=device))
                attach_int8_weights(model, {name: quantize_q8_0(weight)}, torch.bfloat16, device)
        model = model.to_empty(device=device)  # the parameters left, the 8-bit weights untouched
        for name, p in sorted(model.named_parameters()):
            fill(name, p)
    return model.eval().requires_grad_(False)


def dequantize_in_place(model: LMModel) -> LMModel:
    """The bfloat16 LM of the same (Q8_0-rounded) weights: each 8-bit weight becomes a
    bfloat16 parameter again, one at a time (the int8 copy is dropped as it goes)."""
    with torch.no_grad():
        for module in model.modules():
            for attr, weight in list(vars(module).items()):
                if isinstance(weight, QuantizedWeight):
                    delattr(module, attr)
                    module.register_parameter(attr, torch.nn.Parameter(weight.dequantize(torch.bfloat16), False))
    return model


def random_mimi(smoke: bool, device: torch.device, seed: int) -> MimiModel:
    """The full-size Mimi in float32 (made on the host, 79 M parameters, then moved), random
    codebooks so that codes differ; or (smoke) the tests' tiny Mimi of the same layout."""
    if smoke:
        from tiny_mimi import tiny_mimi

        mimi = tiny_mimi(seed)
    else:
        torch.manual_seed(seed)
        mimi = MimiModel().eval()
        with torch.no_grad():  # the constructor's codebooks are all zero: every code a tie
            for layer in [*mimi.quantizer.rvq_first.vq.layers, *mimi.quantizer.rvq_rest.vq.layers]:
                layer._codebook.embedding_sum.normal_()
    mimi = mimi.to(device).requires_grad_(False)
    mimi.num_codebooks = USER_STREAMS
    return mimi


def compile_mimi(mimi: MimiModel, mode: str, device: torch.device) -> None:
    """Mimi's streaming steps as the engines run them beside an LM stepped in `mode`: on CUDA
    compiled whole (`MimiModel.compile_steps`; "cuda-graphs": replayed as CUDA graphs)."""
    if compiles(device, mode):
        mimi.compile_steps(mode=compile_mode(mode))


# -- measuring ------------------------------------------------------------------------------

class HostClock:
    """`perf_counter` marks; `seconds(marks)`: the time between consecutive marks."""

    @staticmethod
    def mark() -> float:
        return time.perf_counter()

    @staticmethod
    def seconds(marks: list) -> list[float]:
        return [b - a for a, b in zip(marks, marks[1:])]


class CudaClock:
    """CUDA events: a part's time without a host sync between parts; one sync at the end."""

    @staticmethod
    def mark() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(marks: list) -> list[float]:
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]


def compile_counts() -> dict[str, int]:
    """torch.compile's running counts: graphs compiled, graph breaks, and graphs that CUDA-graph
    mode left unrecorded (e.g. for mutating inputs it does not hold static)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def since(before: dict[str, int]) -> dict[str, int]:
    """What `compile_counts` gained since `before`."""
    return {name: count - before[name] for name, count in compile_counts().items()}


def percentiles(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"p50_s": times[len(times) // 2], "p95_s": times[int(0.95 * (len(times) - 1))]}


class Session:
    """One run: its plan, clock and bandwidth, and the results, written to `json_path` each time
    a figure comes in (a run cut short keeps what it had)."""

    def __init__(self, plan: Plan, json_path: Path) -> None:
        self.plan, self.json_path = plan, json_path
        self.begun = time.perf_counter()
        self.clock = CudaClock() if plan.device.type == "cuda" else HostClock()
        self.results: dict = {"smoke": plan.smoke, "plan": {**asdict(plan), "device": str(plan.device)},
                              "machine": machine(plan.device), "budget_s": FRAME_SECONDS, "lm_step": [], "sweeps": {}}
        self.bandwidth = device_read_bandwidth(plan.device, 1 if plan.smoke else 4, 2 if plan.smoke else 5)
        self.results["bandwidth"] = {"bytes_per_second": self.bandwidth.bytes_per_second, "read": self.bandwidth.read,
                                     "gib": self.bandwidth.gib, "repeats": self.bandwidth.repeats}
        self.record()
        print(f"read bandwidth {self.bandwidth}", file=sys.stderr)

    def record(self) -> None:
        self.results["seconds"] = time.perf_counter() - self.begun
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.results, indent=1))

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.begun > self.plan.time_limit

    def timed(self, step, count: int) -> tuple[float, list[list[float]]]:
        """`step(mark)` run `warmup_steps + count` times, calling `mark()` after each of its parts:
        the seconds of the steps left out, and each timed step's parts' seconds."""
        device, clock = self.plan.device, self.clock
        warm, parts = 0.0, []
        for i in range(self.plan.warmup_steps + count):
            start = time.perf_counter()
            if device.type == "cuda":  # the last replay's outputs are consumed: the next may overwrite them
                torch.compiler.cudagraph_mark_step_begin()
            marks = [clock.mark()]
            step(lambda: marks.append(clock.mark()))
            seconds = clock.seconds(marks)
            if i < self.plan.warmup_steps:
                warm += time.perf_counter() - start
            else:
                parts.append(seconds)
        return warm, parts


def conversations(gen: LMGenerator, batch: int, seed: int):
    """A generation state of `batch` slots, warmed up on as an engine warms its own at load
    (`LMGenerator.warm_up`: compilation, and the capture of the graph that its steps replay),
    then each slot given Kyutai's default sampling and its own seed; and the warm-up's seconds."""
    state = gen.init_state(batch, per_slot_sampling=True)
    warm = gen.warm_up(state)
    for slot in range(batch):
        state.slots.configure(slot, SamplingParams(), seed + slot)
    return state, warm


def time_lm(session: Session, gen: LMGenerator) -> dict:
    """The LM step alone at one conversation. Warm-up: `LMGenerator.warm_up` plus the steps
    left out."""
    plan, device = session.plan, session.plan.device
    counts = compile_counts()
    state, warm = conversations(gen, 1, plan.seed)
    active = torch.ones(1, dtype=torch.bool, device=device)
    codes = torch.randint(0, gen.lm.cfg.card, (1, USER_STREAMS, 1), device=device)

    def step(mark) -> None:
        gen.step(codes, state, active=active)
        mark()

    skipped, parts = session.timed(step, plan.steps)
    return {**percentiles([p[0] for p in parts]), "status": "ok", "warmup_s": warm + skipped,
            "state_bytes": tensor_bytes(state), "compile": since(counts)}


def time_frames(session: Session, gen: LMGenerator, mimi: MimiModel, batch: int) -> dict:
    """`batch` conversations stepped as the live engine steps them: encode, LM, decode. Memory:
    the device's peak while they run (after the LM's warm-up), over what was held before."""
    plan, device = session.plan, session.plan.device
    cuda = device.type == "cuda"
    counts = compile_counts()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated(device)
    lm_state, warm = conversations(gen, batch, plan.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    mimi_state = mimi.init_state(batch)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    wav = torch.randn(batch, 1, mimi.frame_size, generator=torch.Generator().manual_seed(plan.seed)).to(device) * 0.1

    def frame(mark) -> None:
        codes = mimi.encode_step(wav, mimi_state, USER_STREAMS, active=active)
        mark()
        out = gen.step(codes, lm_state, active=active)
        mark()
        mimi.decode_step(out[:, 1:, None].clamp(min=0), mimi_state, active=active)  # first steps' -2: a placeholder
        mark()

    skipped, parts = session.timed(frame, plan.frames)
    result = {name: percentiles([pick(p) for p in parts]) for name, pick in FRAME_PARTS.items()}
    result.update(conversations=batch, status="ok", warmup_s=warm + skipped,
                  lm_state_bytes=tensor_bytes(lm_state), mimi_state_bytes=tensor_bytes(mimi_state),
                  peak_bytes=torch.cuda.max_memory_allocated(device) - held if cuda else None,
                  compile=since(counts))
    return result


FRAME_PARTS = {  # a frame's parts' seconds (encode, LM, decode) -> each figure
    "frame": sum, "encode": lambda p: p[0], "lm": lambda p: p[1], "decode": lambda p: p[2],
    "mimi": lambda p: p[0] + p[2],
}


def sweep(session: Session, gen: LMGenerator, mimi: MimiModel, record) -> None:
    """`time_frames` for each batch size, with bounds; stops at the first that does not fit in
    memory, or when the run's time is up."""
    weights = step_bytes(gen.lm)
    mimi_weights = mimi_bytes(mimi, "encode") + mimi_bytes(mimi, "decode")
    rows: list[dict] = []
    for batch in session.plan.batches:
        if session.out_of_time():
            rows.append({"conversations": batch, "status": NOT_RUN})
            record(rows)
            continue
        try:
            row = time_frames(session, gen, mimi, batch)
        except RuntimeError as exc:  # torch.OutOfMemoryError, or one a compiler wrapped
            if "out of memory" not in str(exc).lower():
                raise
            row = {"conversations": batch, "status": "out of memory"}
        gc.collect()
        if session.plan.device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        if row["status"] != "ok":
            record(rows)
            break
        mimi_read = mimi_weights + row["mimi_state_bytes"]
        row.update(bytes_read=weights + row["lm_state_bytes"] + mimi_read, mimi_bytes_read=mimi_read)
        row.update(bound_s=session.bandwidth.bound(row["bytes_read"]), mimi_bound_s=session.bandwidth.bound(mimi_read))
        record(rows)


NOT_RUN = "not run (time limit)"


def within_budget(rows: list[dict]) -> int:
    """The largest number of conversations whose frame p95 is within the 80 ms frame (0: none)."""
    fits = [r["conversations"] for r in rows if r["status"] == "ok" and r["frame"]["p95_s"] <= FRAME_SECONDS]
    return max(fits, default=0)


def per_conversation(rows: list[dict]) -> dict:
    """Device memory and state each extra conversation adds: least-squares slopes over B."""
    ok = [r for r in rows if r["status"] == "ok"]

    def slope(key) -> float | None:
        points = [(r["conversations"], key(r)) for r in ok if key(r) is not None]
        if len(points) < 2:
            return None
        mean_b = sum(b for b, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        spread = sum((b - mean_b) ** 2 for b, _ in points)
        return sum((b - mean_b) * (y - mean_y) for b, y in points) / spread

    return {"peak_bytes": slope(lambda r: r["peak_bytes"]),
            "state_bytes": slope(lambda r: r["lm_state_bytes"] + r["mimi_state_bytes"])}


# -- the run --------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    """The machine line's parts: the card (or the CPU) and the versions that decide the kernels."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    info = {"device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    else:
        from machine import cpu_model

        info.update(name=cpu_model(), memory_bytes=None, threads=torch.get_num_threads())
    return info


def machine_line(info: dict) -> str:
    memory = f", {info['memory_bytes'] / 2**30:.0f} GiB" if info["memory_bytes"] else ""
    return (f"{info['name']}{memory}; torch {info['torch']}, CUDA {info['cuda'] or 'none'}, "
            f"triton {info['triton'] or 'not installed'}")


def run(plan: Plan, json_path: Path) -> dict:
    """Every measurement of `plan`: q8 first (the default model, and the weights are made
    int8), then bf16 from the same weights dequantized."""
    session = Session(plan, json_path)
    mimi = random_mimi(plan.smoke, plan.device, plan.seed)
    lm = random_lm(plan.smoke, plan.device, plan.seed)
    compile_mimi(mimi, plan.sweep_mode, plan.device)  # once, for every dtype
    with torch.inference_mode():
        for dtype in plan.dtypes:
            if dtype == "bf16":
                torch._dynamo.reset()  # compiled q8 steps hold on to the int8 weights
                lm = dequantize_in_place(lm)
            measure_dtype(session, lm, mimi, dtype)
            gc.collect()
    session.results["goals"] = goals(session.results)
    session.record()
    return session.results


def goals(results: dict) -> list[dict]:
    """Issue 16's goals for a GPU, each with its figure (the best mode's) and whether it is met
    (None: not measured)."""
    def best(dtype: str) -> float | None:
        return min((r["p50_s"] for r in results["lm_step"] if r["dtype"] == dtype and r["status"] == "ok"),
                   default=None)

    bf16, q8 = best("bf16"), best("q8")
    carried = max((s["max_conversations"] for s in results["sweeps"].values()
                   if any(r["status"] == "ok" for r in s["rows"])), default=None)
    return [
        {"goal": "7B bf16 step p50 <= 12 ms at one conversation", "figure": bf16,
         "met": None if bf16 is None else bf16 <= 0.012},
        {"goal": "7B q8 step p50 <= bf16's at one conversation", "figure": q8,
         "met": None if q8 is None or bf16 is None else q8 <= bf16},
        {"goal": ">= 64 conversations, every frame within 80 ms at p95 (Mimi on the same GPU)", "figure": carried,
         "met": None if carried is None else carried >= 64},
    ]


def measure_dtype(session: Session, lm: LMModel, mimi: MimiModel, dtype: str) -> None:
    """The LM step at one conversation in each mode, then (if asked) the sweep, for `lm` in
    `dtype`; the generators (and their compiled steps) die on return."""
    plan, results = session.plan, session.results
    weights = step_bytes(lm)
    generators = {}
    for mode in plan.modes:
        row = {"dtype": dtype, "mode": mode, "compiled": compiles(plan.device, mode), "conversations": 1}
        if session.out_of_time():
            results["lm_step"].append({**row, "status": NOT_RUN})
            continue
        generators[mode] = gen = LMGenerator(lm, SamplingParams(), gpu_step=mode)
        row.update(time_lm(session, gen))
        row["bytes_read"] = weights + row["state_bytes"]
        row["bound_s"] = session.bandwidth.bound(row["bytes_read"])
        results["lm_step"].append(row)
        session.record()
        print(f"LM step {dtype} {mode}: p50 {ms(row['p50_s'])} ms, warm-up {row['warmup_s']:.1f} s", file=sys.stderr)
    if dtype not in plan.sweep_dtypes:
        return
    mode = plan.sweep_mode
    gen = generators.get(mode) or LMGenerator(lm, SamplingParams(), gpu_step=mode)
    key = f"{dtype} {mode}"

    def record(rows: list[dict]) -> None:
        results["sweeps"][key] = {"dtype": dtype, "mode": mode, "compiled": compiles(plan.device, mode), "rows": rows,
                                  "max_conversations": within_budget(rows), "per_conversation": per_conversation(rows)}
        session.record()
        last = rows[-1]
        done = f"p95 {ms(last['frame']['p95_s'])} ms" if last["status"] == "ok" else last["status"]
        print(f"{key}, {last['conversations']} conversations: {done}", file=sys.stderr)

    sweep(session, gen, mimi, record)


def compiles(device: torch.device, mode: str) -> bool:
    """Whether `mode` compiles on `device`: only on CUDA (elsewhere every mode runs eager)."""
    return device.type == "cuda" and mode != "eager"


# -- the table ------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if abs(nbytes) >= scale / 10:
            return f"{nbytes / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{nbytes / 1e3:.1f} kB"


def table(results: dict) -> str:
    bandwidth = DeviceBandwidth(**results["bandwidth"])
    where = " (SMOKE: tiny models on the CPU, every mode eager: not figures)" if results["smoke"] else ""
    lines = [f"Moshi 7B + Mimi on one device{where}; {machine_line(results['machine'])}; read bandwidth {bandwidth}; "
             "random weights, per-slot sampling, lockstep",
             "", "| measure | conversations | p50 (ms) | p95 (ms) | bound (ms) | p50 / bound | memory | warm-up (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    compiled = []
    for r in results["lm_step"]:
        lines.append(_row(f"LM step, {r['dtype']}, {r['mode']}", r, r, "bound_s", "—"))
        if r["status"] == "ok" and r["compiled"]:
            compiled.append(f"LM step, {r['dtype']}, {r['mode']}: {_counts(r['compile'])}")
    summary = []
    for key, s in results["sweeps"].items():
        for r in s["rows"]:
            lines.append(_row(f"frame (Mimi + LM {key} + Mimi)", r, r.get("frame"), "bound_s", size(r.get("peak_bytes"))))
            if r["status"] == "ok":
                lines.append(_row(f"Mimi encode + decode, {s['mode']}", r, r["mimi"], "mimi_bound_s", warm_up=False))
                if s["compiled"]:
                    compiled.append(f"frame, {key}, {r['conversations']} conversations: {_counts(r['compile'])}")
        extra = s["per_conversation"]
        summary.append(f"{key}: {s['max_conversations']} conversations within {FRAME_SECONDS * 1000:.0f} ms at p95; "
                       f"each extra conversation: {size(extra['peak_bytes'])} of device memory "
                       f"({size(extra['state_bytes'])} of state)")
    met = {True: "met", False: "missed", None: "not measured"}
    lines += ["", *summary, *(f"goal: {g['goal']}: {met[g['met']]}" for g in results["goals"]),
              *(f"compiled: {c}" for c in compiled), f"run: {results['seconds']:.0f} s"]
    return "\n".join(lines)


def _row(label: str, r: dict, figure: dict | None, bound: str, memory: str = "", warm_up: bool = True) -> str:
    """One line of the table: `figure`'s percentiles beside `r[bound]`, or `r`'s status."""
    if r["status"] != "ok":
        return f"| {label} | {r['conversations']} | {r['status']} | | | | | |"
    warm = f"{r['warmup_s']:.1f}" if warm_up else ""
    return (f"| {label} | {r['conversations']} | {ms(figure['p50_s'])} | {ms(figure['p95_s'])} | {ms(r[bound])} | "
            f"{figure['p50_s'] / r[bound]:.2f} | {memory} | {warm} |")


def _counts(counts: dict) -> str:
    return (f"{counts['graphs']} graphs, {counts['graph_breaks']} graph breaks, "
            f"{counts['cudagraph_skips']} left out of CUDA graphs")


def parse_plan(argv: list[str] | None = None) -> tuple[Plan, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke: a check that it runs)")
    parser.add_argument("--smoke", action="store_true", help="a tiny LM and Mimi, B in {1, 2}, a few steps")
    parser.add_argument("--batches", help=f"conversations per frame (default: {','.join(map(str, BATCHES))})")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="LM weights at one conversation (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="LM step modes at one conversation (default: %(default)s)")
    parser.add_argument("--sweep-dtypes", default="q8", help="LM weights of the conversation sweep (default: %(default)s)")
    parser.add_argument("--sweep-mode", default="cuda-graphs", choices=GPU_STEPS,
                        help="step mode of the sweep (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="timed LM steps at one conversation (default: 100; smoke 4)")
    parser.add_argument("--frames", type=int, help="timed frames per batch size (default: 50; smoke 4)")
    parser.add_argument("--warmup-steps", type=int, help="steps left out of the timing (default: 5; smoke 1)")
    parser.add_argument("--time-limit", type=float, default=420,
                        help="seconds after which no new measurement starts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the figures go (default: %(default)s)")
    args = parser.parse_args(argv)

    def listed(text: str, allowed) -> tuple:
        values = tuple(v for v in text.split(",") if v)
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"{', '.join(bad)}: not one of {', '.join(allowed)}")
        return values

    dtypes = tuple(d for d in DTYPES if d in listed(args.dtypes, DTYPES))  # in the order they are made
    modes = listed(args.modes, GPU_STEPS)
    sweep_dtypes = listed(args.sweep_dtypes, dtypes)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (
        SMOKE_BATCHES if args.smoke else BATCHES)
    if not batches or min(batches) < 1:
        parser.error("--batches: positive numbers of conversations")
    small = args.smoke
    plan = Plan(device=torch.device(args.device), smoke=args.smoke, batches=batches, dtypes=dtypes, modes=modes,
                sweep_dtypes=sweep_dtypes, sweep_mode=args.sweep_mode, steps=args.steps or (4 if small else 100),
                frames=args.frames or (4 if small else 50),
                warmup_steps=args.warmup_steps if args.warmup_steps is not None else (1 if small else 5),
                time_limit=args.time_limit, seed=args.seed)
    return plan, args.json


def main() -> int:
    plan, json_path = parse_plan()
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py measures a CUDA GPU and this machine has none (torch sees no CUDA device); "
              "`--device cpu --smoke` checks that it runs.", file=sys.stderr)
        return 2
    if plan.device.type != "cuda" and not plan.smoke:
        print("bench/gpu.py: off a GPU only `--smoke` runs (the 7B on a CPU is `make bench`).", file=sys.stderr)
        return 2
    torch.manual_seed(plan.seed)
    results = run(plan, json_path)
    print(table(results))
    print(f"figures: {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
