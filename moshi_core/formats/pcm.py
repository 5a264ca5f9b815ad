"""16-bit PCM <-> float samples: the one conversion pair every reader and writer uses.

Floats in [-1, 1] become int16 by clipping, scaling by 32767 and rounding (so +1.0 and -1.0
map to +-32767, symmetric); int16 becomes float by dividing by 32768 (so -32768 is exactly
-1.0). These are the conventions of libsndfile, which writes and reads our WAV files.
"""

import numpy as np
import torch

SAMPLE_RATE = 24000  # Mimi's, so every waveform in this project's interfaces


def float_to_pcm16(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float samples (any shape) -> int16, clipped to [-1, 1]."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().to("cpu", torch.float32).numpy()
    data = np.asarray(samples, dtype=np.float32)
    return np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype(np.int16)


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    """int16 samples (any shape) -> float32 in [-1, 1)."""
    return np.asarray(samples, dtype=np.int16).astype(np.float32) / 32768.0


def pcm16_bytes(samples: torch.Tensor | np.ndarray) -> bytes:
    """Float samples -> 16-bit little-endian PCM bytes, as WAV files and raw streams hold them."""
    return float_to_pcm16(samples).astype("<i2").tobytes()


def pcm16_from_bytes(data: bytes) -> np.ndarray:
    """16-bit little-endian PCM bytes -> float32 samples (a trailing odd byte is ignored)."""
    usable = len(data) - len(data) % 2
    return pcm16_to_float(np.frombuffer(data[:usable], dtype="<i2"))
