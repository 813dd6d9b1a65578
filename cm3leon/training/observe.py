"""What a training run reports: metrics JSONL, a loss-curve PNG, optional TensorBoard, the MFU estimate."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from cm3leon.config import CM3LeonConfig

__all__ = ["MetricsLog", "matmul_peak_flops", "plot_metrics", "train_flops"]


def train_flops(config: CM3LeonConfig, cu_seqlens: torch.Tensor) -> float:
    """Forward + backward FLOPs of one packed batch: 6 per matmul parameter per token (projections, FFN and
    the output layer) plus the causal attention products (QK^T and PV, 3x for the backward)."""
    lengths = cu_seqlens.diff().double()
    tokens = float(lengths.sum())
    d, f = config.d_model, config.hidden_dim
    kv = config.kv_heads * config.head_dim
    ffn_mats = 3 if config.activation == "swiglu" else 2
    per_layer = 2 * d * d + 2 * d * kv + ffn_mats * d * f
    matmul_params = config.n_layers * per_layer + config.vocab_size * d
    causal_pairs = float((lengths * (lengths + 1) / 2).sum())  # (query, key) pairs per sequence
    attention = 3 * 2 * 2 * config.d_model * causal_pairs * config.n_layers
    return 6.0 * matmul_params * tokens + attention


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                      repeats: int = 5) -> float:
    """Measured dense matmul throughput (FLOP/s) of ``device`` in ``dtype``: the MFU denominator. Best of
    ``repeats`` square products (1024 on CPU, 8192 on GPU by default)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` (and TensorBoard scalars when available).

    On resume at step ``k``, :meth:`truncate_after` drops records of steps after ``k`` that a crashed run had
    written, so the file holds exactly one curve.
    """

    def __init__(self, path: Path, *, tensorboard: bool) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional: the JSONL log is the record
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Draws training loss (and validation loss when present) against the step into ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
