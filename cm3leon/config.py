"""Model configuration and presets for the CM3Leon (OPT-like) and Chameleon (Llama-like) layouts.

Presets (see docs/recipe.md §1): ``cm3leon-350m``, ``cm3leon-760m``, ``cm3leon-7b`` — pre-LayerNorm without
learnable parameters, learned absolute positions, ReLU FFN of width 4·d_model, no biases, tied embeddings,
sequence length 4096; ``chameleon-7b`` — the Hugging Face ``ChameleonForConditionalGeneration`` layout
(RMSNorm, QK-norm, SwiGLU, RoPE, untied output layer). ``tiny`` and ``demo`` are small presets for tests
and the CPU demo.

Vocabulary of the CM3Leon presets: 56,320 ids in all (specials + text BPE + the 8,192 image codes). The paper
gives 56,320 as "the" vocabulary size without saying whether the image codes are inside it; counting them
inside is what reproduces the published parameter counts (350M / 760M / 7B within 5%).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rope"]
Activation = Literal["relu", "gelu", "swiglu"]

PAPER_VOCAB = 56_320


@dataclass(frozen=True)
class CM3LeonConfig:
    """Architecture of a decoder-only transformer over one text+image token vocabulary.

    Attributes:
        vocab_size: total ids (specials + text + image codes).
        d_model, n_layers, n_heads: width, depth, query heads.
        n_kv_heads: key/value heads (GQA/MQA when < n_heads); None means n_heads.
        ffn_dim: hidden width of the feed-forward block.
        max_seq_len: longest sequence (learned-position table size and default KV-cache length).
        norm: "layernorm" or "rmsnorm"; norm_affine: learnable scale (and bias for LayerNorm).
        norm_eps: epsilon of the block norms.
        positions: "learned" absolute embeddings or "rope" rotary embeddings (rope_theta).
        activation: "relu" / "gelu" (two-matrix FFN) or "swiglu" (gated, three matrices).
        qk_norm: per-head LayerNorm of queries and keys with per-head affine (Chameleon's QK-norm).
        tie_embeddings: output projection shares the input embedding matrix.
        init_std: truncated-normal std of weights (cut at ±3 std); pos_init_std: of learned positions.
        zero_init_output_proj: attention/FFN output projections start at zero (paper's initialisation).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 4096
    norm: Norm = "layernorm"
    norm_affine: bool = False
    norm_eps: float = 1e-5
    positions: Positions = "learned"
    rope_theta: float = 10_000.0
    activation: Activation = "relu"
    qk_norm: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.006
    pos_init_std: float = 0.0002
    zero_init_output_proj: bool = True

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not hasattr(type(value), "__index__"):  # ints, numpy ints
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_heads", "ffn_dim"):  # optional sizes: None or a positive int
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not hasattr(type(value), "__index__")):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        # Floats must be finite: a NaN norm_eps (e.g. from a crafted checkpoint) gives a model of NaNs.
        for name, low, inclusive in (("norm_eps", 0.0, False), ("rope_theta", 0.0, False),
                                     ("init_std", 0.0, True), ("pos_init_std", 0.0, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < low or (value == low and not inclusive):
                bound = f"{'>=' if inclusive else '>'} {low}"
                raise ValueError(f"{name} must be a finite number {bound}, got {value}")
        for name in ("norm_affine", "qk_norm", "tie_embeddings", "zero_init_output_proj"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        for name, allowed in (("norm", Norm.__args__), ("positions", Positions.__args__),
                              ("activation", Activation.__args__)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or 4 * self.d_model

    def replace(self, **changes: Any) -> CM3LeonConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CM3LeonConfig:
        return dataclass_from_json(cls, text)


def dataclass_from_json(cls: type, text: str) -> Any:
    """``cls(**json.loads(text))`` for a config dataclass; ValueError naming unknown fields."""
    data = json.loads(text)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in JSON: {unknown}")
    return cls(**data)


def _cm3leon(d_model: int, n_layers: int, n_heads: int) -> CM3LeonConfig:
    return CM3LeonConfig(vocab_size=PAPER_VOCAB, d_model=d_model, n_layers=n_layers,
                         n_heads=n_heads)


PRESETS: dict[str, CM3LeonConfig] = {
    "cm3leon-350m": _cm3leon(1024, 24, 16),
    "cm3leon-760m": _cm3leon(1536, 24, 16),
    "cm3leon-7b": _cm3leon(4096, 32, 32),
    "chameleon-7b": CM3LeonConfig(
        vocab_size=65_536, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11_008,
        norm="rmsnorm", norm_affine=True, positions="rope", activation="swiglu", qk_norm=True,
        tie_embeddings=False, init_std=0.02, zero_init_output_proj=False),
    "tiny": CM3LeonConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
    "demo": CM3LeonConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=8, max_seq_len=512),
}


def preset(name: str, **overrides: Any) -> CM3LeonConfig:
    """A named preset, optionally with fields replaced (e.g. ``preset("demo", vocab_size=2048)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
