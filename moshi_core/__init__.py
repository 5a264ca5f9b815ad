"""Our own PyTorch implementation of Kyutai's Mimi codec (and, as it lands, Moshi)."""

from .checkpoints import load_mimi
from .errors import MoshiError
from .mimi import MimiConfig, MimiModel

__all__ = ["MimiConfig", "MimiModel", "MoshiError", "load_mimi"]
__version__ = "0.1.0"
