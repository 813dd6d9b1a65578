"""Training configuration: frozen dataclasses with presets, TOML/JSON round trip and ``a.b=value`` overrides.

A :class:`TrainingConfig` holds top-level settings (stage, seed, output folder) and one section per concern
(:class:`ModelSection`, :class:`DataSection`, :class:`OptimSection`, :class:`ScheduleSection`,
:class:`ParallelSection`, :class:`CheckpointSection`, :class:`LoggingSection`). Every field is type-checked
and range-checked when the object is built, so a bad file or ``--set`` fails before any work starts::

    config = load_config("demo-pretrain", ["optim.lr=3e-4", "schedule.steps=200"])
    config = load_config("my_run.toml")
    Path("run.toml").write_text(config.to_toml())

Override values use TOML value syntax (``3e-4``, ``true``, ``[0.9, 0.95]``, ``"text"``); a bare word is
accepted for string fields. ``model.overrides.<field>=value`` replaces a :class:`cm3leon.CM3LeonConfig` field
of the model preset.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cm3leon.config import PRESETS as MODEL_PRESETS
from cm3leon.config import CM3LeonConfig
from cm3leon.data.tasks import TASKS

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, released separately for Python 3.10 (a dependency there)
    import tomli as tomllib

__all__ = ["CheckpointSection", "DataSection", "LoggingSection", "ModelSection", "OptimSection",
           "ParallelSection", "PRESETS", "ScheduleSection", "TrainingConfig", "load_config"]


def _range(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """A dataclass field with an allowed closed range ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and returns it in canonical form (tuples for arrays,
    float for an int given to a float field). Raises TypeError/ValueError naming the field."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{name} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be an array, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{name} must have {len(args)} elements, got {len(value)}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a table, got {type(value).__name__} {value!r}")
        return dict(value)
    raise TypeError(f"{name}: unsupported field type {tp!r}")  # pragma: no cover - a programming error


class _Section:
    """Validation shared by every section: types from the annotations, ranges from the field metadata."""

    _name = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            name = f"{self._name}.{f.name}" if self._name else f.name
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                if not isinstance(value, hints[f.name]):
                    raise TypeError(f"{name} must be a {hints[f.name].__name__}, got {type(value).__name__}")
                continue
            value = _coerce(value, hints[f.name], name)
            object.__setattr__(self, f.name, value)
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            if lo is not None and (value <= lo if f.metadata["lo_open"] else value < lo):
                raise ValueError(f"{name} must be {'>' if f.metadata['lo_open'] else '>='} {lo}, got {value}")
            if hi is not None and value > hi:
                raise ValueError(f"{name} must be <= {hi}, got {value}")
        self._check()

    def _check(self) -> None:
        """Cross-field checks of a section."""


@dataclass(frozen=True)
class ModelSection(_Section):
    """The network: a :mod:`cm3leon.config` preset with field overrides (``vocab_size`` always comes from the
    data's vocabulary). ``precision="bf16"`` runs forward/backward under bf16 autocast with float32 master
    weights and optimizer state; ``compile`` wraps the model's forward in ``torch.compile``."""

    _name = "model"
    preset: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False

    def _check(self) -> None:
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(MODEL_PRESETS)}, got {self.preset!r}")
        known = {f.name for f in dataclasses.fields(CM3LeonConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"model.overrides has unknown CM3LeonConfig fields {unknown}")
        nulls = sorted(k for k, v in self.overrides.items() if v is None)
        if nulls:  # TOML has no null, so config.toml could not be written (or read back)
            raise ValueError(f"model.overrides: {nulls} must be values, not null (TOML has no null); leave a "
                             "field out to keep the preset's value")
        self.architecture(vocab_size=MODEL_PRESETS[self.preset].vocab_size)  # validates the override values

    def architecture(self, vocab_size: int) -> CM3LeonConfig:
        """The model's :class:`CM3LeonConfig` for a vocabulary of ``vocab_size`` ids."""
        try:
            return MODEL_PRESETS[self.preset].replace(**{**self.overrides, "vocab_size": vocab_size})
        except (TypeError, ValueError) as err:
            raise type(err)(f"model.overrides: {err}") from None


@dataclass(frozen=True)
class DataSection(_Section):
    """Where the training documents come from and how they are packed.

    ``source``: ``"shapes"`` (the built-in world; tokenizers trained and documents tokenized once under
    ``corpus_dir``), ``"folder"`` (an image folder with ``captions.jsonl`` at ``path``) or ``"webdataset"``
    (tar shards matching ``path``, e.g. ``"data/shard-{000000..000099}.tar"``). Real data uses the
    tokenizers found in ``corpus_dir`` (trained on the shapes world when absent).
    Pretraining draws CM3 sequences; with ``memory_bank`` set (a saved :class:`cm3leon.retrieval.MemoryBank`,
    searched with the saved ``DualEncoder`` at ``retrieval_encoder``) the bank's documents are the queries and
    each one is retrieval-augmented with ``retrieved`` documents (the paper keeps 3). The SFT stage mixes
    ``sft_tasks``, balancing them with per-task sampling ratios clamped to ``[sft_ratio_min, sft_ratio_max]``
    (``documents`` and ``val_documents`` are then split evenly over the tasks). ``tokens_per_batch`` is per
    process and micro-batch.
    """

    _name = "data"
    source: Literal["shapes", "folder", "webdataset"] = "shapes"
    path: str = ""
    corpus_dir: str = "runs/shapes-corpus"
    documents: int = _range(4000, 1)
    val_documents: int = _range(200, 0)
    text_vocab_size: int = _range(1024, 256)
    text_examples: int = _range(6000, 1)
    image_tokenizer: Literal["tiny", "demo", "paper"] = "demo"
    image_tokenizer_steps: int = _range(1500, 1)
    tokens_per_batch: int = _range(2048, 1)
    max_seq_len: int = _range(512, 2)
    num_workers: int = _range(0, 0)
    poisson_rate: float = _range(1.0, 0.0, lo_open=True)
    max_spans: int = _range(16, 1, 16)
    transform_probability: float = _range(1.0, 0.0, 1.0)
    memory_bank: str = ""
    retrieval_encoder: str = ""
    retrieved: int = _range(3, 0, 8)
    sft_tasks: tuple[str, ...] = TASKS
    sft_ratio_min: float = _range(0.3, 0.0, lo_open=True)
    sft_ratio_max: float = _range(3.0, 1.0)

    def _check(self) -> None:
        if self.source != "shapes" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        if self.tokens_per_batch < self.max_seq_len:
            raise ValueError(f"data.tokens_per_batch ({self.tokens_per_batch}) must be >= data.max_seq_len "
                             f"({self.max_seq_len}) so every sequence fits in a batch")
        bad = [t for t in self.sft_tasks if t not in TASKS]
        if bad or not self.sft_tasks:
            raise ValueError(f"data.sft_tasks must be a non-empty subset of {TASKS}, got {self.sft_tasks}")
        if bool(self.memory_bank) != bool(self.retrieval_encoder):
            raise ValueError("data.memory_bank and data.retrieval_encoder go together (the bank is searched "
                             "with the encoder that embedded it)")
        if self.memory_bank and self.source != "shapes":
            # the bank's documents are the training queries: data.path would be tokenized, then ignored
            raise ValueError(f"data.source={self.source!r} cannot be combined with data.memory_bank (the "
                             "bank's documents are the training data)")
        if self.sft_ratio_min > 1.0:
            raise ValueError(f"data.sft_ratio_min must be <= 1, got {self.sft_ratio_min}")


@dataclass(frozen=True)
class OptimSection(_Section):
    """AdamW (weight decay on matrices only), global-norm gradient clipping, gradient accumulation over
    ``grad_accum`` micro-batches, and the non-finite-loss policy: a step whose loss or gradient norm is
    NaN/inf is skipped; ``max_bad_steps`` such steps in a row stop training with an error."""

    _name = "optim"
    lr: float = _range(6e-4, 0.0, lo_open=True)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = _range(1e-8, 0.0, lo_open=True)
    weight_decay: float = _range(0.1, 0.0)
    grad_clip: float = _range(1.0, 0.0)
    grad_accum: int = _range(1, 1)
    max_bad_steps: int = _range(5, 1)

    def _check(self) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class ScheduleSection(_Section):
    """``steps`` optimizer steps: linear warmup over ``warmup`` steps to the peak LR, then ``decay`` down to
    ``min_lr_ratio`` x peak at the last step."""

    _name = "schedule"
    steps: int = _range(1000, 1)
    warmup: int = _range(100, 0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = _range(0.1, 0.0, 1.0)


@dataclass(frozen=True)
class ParallelSection(_Section):
    """``mode``: ``"none"`` (one process), ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard``), under
    ``torchrun``; ``backend`` ``"auto"`` picks NCCL on GPUs and gloo on CPUs."""

    _name = "parallel"
    mode: Literal["none", "ddp", "fsdp"] = "none"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class CheckpointSection(_Section):
    """Checkpoints under ``<out_dir>/checkpoints/step-N/`` every ``every`` steps (0: only at the end and on
    SIGTERM/SIGINT), keeping the newest ``keep``. ``init_from`` starts the weights from a training checkpoint
    folder (its newest complete ``step-N``) or a ``cm3leon.save`` file (how SFT starts from pretraining).
    ``export`` writes ``<out_dir>/model.safetensors`` for generation at the end."""

    _name = "checkpoint"
    every: int = _range(0, 0)
    keep: int = _range(3, 1)
    init_from: str = ""
    export: bool = True


@dataclass(frozen=True)
class LoggingSection(_Section):
    """Metrics every ``every`` steps (``metrics.jsonl``), validation loss on held-out documents every
    ``val_every`` steps (0: never) over ``val_batches`` batches, a loss-curve PNG at the end (and on SIGUSR1),
    TensorBoard when installed and ``tensorboard`` is set, a tqdm bar when ``progress``."""

    _name = "logging"
    every: int = _range(10, 1)
    val_every: int = _range(100, 0)
    val_batches: int = _range(4, 1)
    plot: bool = True
    tensorboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """A whole training run. ``threads`` sets ``torch.set_num_threads`` (0: leave as is)."""

    stage: Literal["pretrain", "sft"] = "pretrain"
    seed: int = _range(0, 0)
    out_dir: str = "runs/train"
    threads: int = _range(0, 0)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def _check(self) -> None:
        if self.stage == "sft" and (self.data.source != "shapes" or self.data.memory_bank):
            # SFT trains on the shapes task families only; other data settings would be silently ignored
            raise ValueError("stage='sft' trains on the shapes task families: data.source must be 'shapes' "
                             "and data.memory_bank empty")
        if self.schedule.warmup > self.schedule.steps:
            raise ValueError(f"schedule.warmup ({self.schedule.warmup}) must be <= schedule.steps "
                             f"({self.schedule.steps})")
        if self.data.max_seq_len > self.model.architecture(vocab_size=1).max_seq_len:
            raise ValueError(f"data.max_seq_len ({self.data.max_seq_len}) exceeds the model's max_seq_len "
                             f"({self.model.architecture(vocab_size=1).max_seq_len})")

    # ---- dict / JSON / TOML --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists): what TOML and JSON hold."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Builds a config from a nested dict; unknown keys raise ValueError naming them."""
        return _from_dict(cls, data, "")

    @classmethod
    def from_json(cls, text: str) -> TrainingConfig:
        return cls.from_dict(json.loads(text))

    def to_toml(self) -> str:
        """TOML text that :func:`load_config` reads back to an equal config."""
        top, tables = [], []
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                tables.append(_toml_table(key, value))
            else:
                top.append(f"{key} = {_toml_value(value)}")
        return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> TrainingConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"invalid TOML: {err}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> TrainingConfig:
        """Applies ``"section.field=value"`` strings (``--set``), converting values to the fields' types."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"override {item!r} must look like section.field=value")
            path = key.strip().split(".")
            node = data
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"unknown config key {key!r} in override {item!r}")
                node = node[part]
            if path[-1] not in node and not (len(path) == 3 and path[:2] == ["model", "overrides"]):
                raise ValueError(f"unknown config key {key!r} in override {item!r}")
            node[path[-1]] = _parse_value(raw.strip(), isinstance(node.get(path[-1]), str))
        return type(self).from_dict(data)


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{prefix or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ValueError(f"unknown config keys {unknown} in {where}; known: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]):
            value = _from_dict(hints[key], value, f"{prefix}.{key}" if prefix else key)
        kwargs[key] = value
    return cls(**kwargs)


def _parse_value(raw: str, is_string_field: bool) -> Any:
    """A ``--set`` value in TOML value syntax; a bare word stays a string for string fields."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if is_string_field:
            return raw
        raise ValueError(f"cannot parse override value {raw!r} (use TOML syntax: 3e-4, true, [1, 2], "
                         "\"text\")") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")  # pragma: no cover


def _toml_string(text: str) -> str:
    """A TOML basic string in ASCII (so the file reads back whatever the locale it was written in). Not
    ``json.dumps``: JSON escapes characters beyond U+FFFF as surrogate pairs, which TOML refuses."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _toml_table(name: str, values: dict[str, Any]) -> str:
    return "\n".join([f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items())])


# ---- presets -----------------------------------------------------------------------------------------------

def _demo_pretrain() -> TrainingConfig:
    """The CPU demo: the demo model on the shapes world, a few hundred steps."""
    return TrainingConfig(
        stage="pretrain", out_dir="runs/demo-pretrain",
        model=ModelSection(preset="demo"),
        data=DataSection(documents=4000, val_documents=200, tokens_per_batch=2048, max_seq_len=512),
        optim=OptimSection(lr=1e-3),
        schedule=ScheduleSection(steps=600, warmup=60),
        checkpoint=CheckpointSection(every=200),
        logging=LoggingSection(every=10, val_every=100),
    )


def _demo_sft() -> TrainingConfig:
    """SFT after ``demo-pretrain``: the paper's SFT/pretraining ratios (LR 5e-5 vs 6e-4, warmup 150 vs 1500)
    applied to the demo's pretraining LR and warmup."""
    pre = _demo_pretrain()
    return pre.replace(
        stage="sft", out_dir="runs/demo-sft",
        optim=dataclasses.replace(pre.optim, lr=pre.optim.lr * 5e-5 / 6e-4),
        schedule=ScheduleSection(steps=300, warmup=max(1, pre.schedule.warmup * 150 // 1500)),
        checkpoint=CheckpointSection(every=100, init_from=str(Path(pre.out_dir) / "checkpoints")),
    )


def _350m_pretrain() -> TrainingConfig:
    """The paper's 350M recipe (docs/recipe.md §1): seq 4096, peak LR 6e-4, 1500 warmup steps, 8M-token global
    batches (here 16 ranks x 16K tokens x 32 micro-batches), bf16 autocast, FSDP."""
    return TrainingConfig(
        stage="pretrain", out_dir="runs/350m-pretrain",
        model=ModelSection(preset="cm3leon-350m", precision="bf16", compile=True),
        data=DataSection(image_tokenizer="paper", text_vocab_size=56_320 - 8192 - 21,
                         tokens_per_batch=16_384, max_seq_len=4096, num_workers=4, documents=1_000_000),
        optim=OptimSection(lr=6e-4, grad_accum=32),
        schedule=ScheduleSection(steps=175_000, warmup=1500),
        parallel=ParallelSection(mode="fsdp"),
        checkpoint=CheckpointSection(every=1000),
        logging=LoggingSection(every=10, val_every=1000),
    )


def _tiny_pretrain() -> TrainingConfig:
    """For tests: tiny model, tiny tokenizers, a handful of steps."""
    return TrainingConfig(
        stage="pretrain", out_dir="runs/tiny-pretrain",
        model=ModelSection(preset="tiny"),
        data=DataSection(documents=48, val_documents=8, text_vocab_size=300, text_examples=200,
                         image_tokenizer="tiny", image_tokenizer_steps=20, tokens_per_batch=256,
                         max_seq_len=128),
        optim=OptimSection(lr=3e-3),
        schedule=ScheduleSection(steps=6, warmup=2),
        checkpoint=CheckpointSection(every=3),
        logging=LoggingSection(every=1, val_every=3, val_batches=1, progress=False, tensorboard=False),
    )


PRESETS: dict[str, typing.Callable[[], TrainingConfig]] = {
    "demo-pretrain": _demo_pretrain,
    "demo-sft": _demo_sft,
    "350m-pretrain": _350m_pretrain,
    "tiny-pretrain": _tiny_pretrain,
}


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """A preset name (``demo-pretrain``, ...) or a ``.toml``/``.json`` file, then ``overrides``."""
    key = str(name_or_path)
    if key in PRESETS:
        config = PRESETS[key]()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"config must be a preset ({', '.join(PRESETS)}) or a .toml/.json file; "
                             f"{key!r} is neither")
        text = path.read_text(encoding="utf-8")
        config = TrainingConfig.from_json(text) if path.suffix == ".json" else TrainingConfig.from_toml(text)
    return config.with_overrides(list(overrides))
