"""cm3leon: a thin CM3Leon-style model, tokenizers, data, training and generation on cm3leon_kernels."""
from .checkpoint import load, load_chameleon, save
from .config import PRESETS, CM3LeonConfig, preset
from .generate import SamplingOptions, generate
from .integrity import CheckpointError
from .kv_cache import KVCache
from .model import CM3Leon
from .objective import CM3Example, cm3_restore, cm3_transform, training_sequence

__version__ = "0.1.0"

__all__ = ["CM3Leon", "CM3LeonConfig", "PRESETS", "preset", "KVCache", "save", "load", "load_chameleon",
           "generate", "SamplingOptions", "CheckpointError", "CM3Example", "cm3_transform", "cm3_restore",
           "training_sequence"]
