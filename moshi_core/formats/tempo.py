"""Speech made faster or slower without changing its pitch: ffmpeg's `atempo` filter, through
PyAV's filter graph, fed piece by piece so that a stream stays a stream."""

import itertools

import av
import numpy as np

from moshi_core.errors import InvalidParameterError
from moshi_core.formats.pcm import SAMPLE_RATE

MIN_SPEED, MAX_SPEED = 0.25, 4.0
STAGE_MIN, STAGE_MAX = 0.5, 2.0  # what one atempo takes in older ffmpeg: slower or faster chain two


def tempo_stages(speed: float) -> list[float]:
    """`speed` as a product of factors each within one atempo's range."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidParameterError(f"speed {speed:g} is out of range: {MIN_SPEED:g} to {MAX_SPEED:g}")
    stages = []
    while speed > STAGE_MAX:
        stages.append(STAGE_MAX)
        speed /= STAGE_MAX
    while speed < STAGE_MIN:
        stages.append(STAGE_MIN)
        speed /= STAGE_MIN
    return [*stages, speed]


class TempoFilter:
    """16-bit mono PCM in (`add`, any length), time-stretched PCM out as it is ready; `finish()`
    drains what the filter holds back (a few tens of ms)."""

    def __init__(self, speed: float, sample_rate: int = SAMPLE_RATE) -> None:
        self.graph = av.filter.Graph()
        source = self.graph.add_abuffer(format="s16", sample_rate=sample_rate, layout="mono",
                                        time_base=f"1/{sample_rate}")
        nodes = [source, *(self.graph.add("atempo", f"{s:.6f}") for s in tempo_stages(speed)),
                 self.graph.add("abuffersink")]
        for a, b in itertools.pairwise(nodes):
            a.link_to(b)
        self.graph.configure()
        self.sample_rate, self.pts = sample_rate, 0

    def add(self, pcm16: bytes) -> bytes:
        samples = np.frombuffer(pcm16, "<i2")
        if samples.size == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.sample_rate, self.pts
        self.pts += samples.size
        self.graph.push(frame)
        return self._pull()

    def finish(self) -> bytes:
        self.graph.push(None)
        return self._pull()

    def _pull(self) -> bytes:
        out = []
        while True:
            try:
                frame = self.graph.pull()
            except (BlockingIOError, EOFError):  # nothing more for now / at all
                return b"".join(out)
            out.append(frame.to_ndarray().astype("<i2").tobytes())
