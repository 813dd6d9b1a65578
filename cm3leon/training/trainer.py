"""The training loop: AdamW with warmup + decay, gradient accumulation, optional bf16 autocast and
torch.compile, DDP/FSDP2, checkpoints with exact resume, fault handling and metrics.

    Trainer(load_config("demo-pretrain")).fit()

Every loss goes through :meth:`cm3leon.CM3Leon.loss`. A step's loss is ``sum(w * CE) / sum(w)`` over every
micro-batch of every rank (the global batch), whatever the split, so a run on N processes optimises the same
objective as one process accumulating N micro-batches.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cm3leon.checkpoint import save as save_model
from cm3leon.model import KERNELS, AttentionBackend, CM3Leon

from .checkpointing import CheckpointManager, load_model_weights
from .config import TrainingConfig
from .data import TrainingData, make_loader
from .observe import MetricsLog, matmul_peak_flops, plot_metrics, train_flops
from .runtime import LaunchError, Runtime, init_runtime, rng_state, set_rng_state

__all__ = ["NonFiniteLossError", "Trainer", "lr_at"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient norm."""


def lr_at(step: int, config: TrainingConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``optim.lr`` over
    ``schedule.warmup`` steps, then cosine/linear decay reaching ``min_lr_ratio * lr`` at the last step."""
    s, peak = config.schedule, config.optim.lr
    if step < s.warmup:
        return peak * (step + 1) / s.warmup
    if s.decay == "constant":
        return peak
    t = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup - 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * t)) if s.decay == "cosine" else 1.0 - t
    return peak * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * shape)


def _check_optional_packages(config: TrainingConfig) -> None:
    """Fails before any work when the config needs a package of the ``training`` extra that is missing."""
    import importlib.util

    needs = {"matplotlib": "logging.plot = true", "webdataset": "data.source = 'webdataset'"}
    wanted = {"matplotlib": config.logging.plot, "webdataset": config.data.source == "webdataset"}
    for package, used in wanted.items():
        if used and importlib.util.find_spec(package) is None:
            raise ImportError(f"{needs[package]} needs {package}: pip install 'cm3leon[training]' "
                              f"(or {package})")


class _Loss(nn.Module):
    """``model.loss`` as a module's forward, so DDP sees (and synchronises) the call."""

    def __init__(self, model: CM3Leon) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, loss_weights, cu_seqlens, max_seqlen):
        return self.model.loss(tokens, targets, loss_weights, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (projections, embeddings) only; norms' vectors are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class _StopSignals:
    """SIGTERM/SIGINT request a checkpoint and a clean stop after the current step; SIGUSR1 requests a
    loss-curve plot. Installed only from the main thread; previous handlers come back on exit."""

    def __init__(self) -> None:
        self.stop: int | None = None
        self.plot = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_stop)
            if hasattr(signal, "SIGUSR1"):
                self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_plot)
        return self

    def _on_stop(self, signum, frame) -> None:
        self.stop = signum

    def _on_plot(self, signum, frame) -> None:
        self.plot = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds the run described by ``config`` (process group, data, model, optimizer) and trains it.

    Args:
        config: the run.
        data: the example sources; by default built from ``config.data`` for ``config.stage``
            (:func:`cm3leon.training.datasets.build_data`).
        attention_backend: the model's attention (the benchmarks pass a PyTorch SDPA backend).
    """

    def __init__(self, config: TrainingConfig, *, data: TrainingData | None = None,
                 attention_backend: AttentionBackend = KERNELS) -> None:
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        self.config = config
        _check_optional_packages(config)
        if config.threads:
            torch.set_num_threads(config.threads)
        init_from = config.checkpoint.init_from
        if init_from and not Path(init_from).exists():  # checked before the data, which can take minutes
            raise LaunchError(f"checkpoint.init_from={init_from!r} does not exist")
        self.runtime: Runtime = init_runtime(config.parallel)
        self.out_dir = Path(config.out_dir)
        if data is None:
            from .datasets import build_data

            data = build_data(config, self.runtime)
        self.data = data
        self.device = self.runtime.device
        self.arch = config.model.architecture(vocab_size=data.vocab_size)
        torch.manual_seed(config.seed)  # same initial weights on every rank and every run
        self.model = CM3Leon(self.arch, attention_backend=attention_backend).to(self.device)
        if config.checkpoint.init_from:
            used = load_model_weights(self.model, config.checkpoint.init_from, self.runtime)
            self._log(f"initial weights from {used}")
        self.loss_fn: nn.Module = self._parallelise()
        groups = _param_groups(self.model, config.optim.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=lr_at(0, config), betas=config.optim.betas,
                                           eps=config.optim.eps)
        self.loader = make_loader(data.train, config, seed=config.seed, rank=self.runtime.rank,
                                  world_size=self.runtime.world_size)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", config.checkpoint.keep,
                                             self.runtime)
        self.step = 0
        self.tokens = 0
        self.bad_steps = 0  # consecutive non-finite steps
        self.skipped_steps = 0  # all non-finite steps of the run
        self._peak_flops: float | None = None

    # ---- setup --------------------------------------------------------------------------------------------
    def _parallelise(self) -> nn.Module:
        mode = self.config.parallel.mode
        if mode == "fsdp":
            from cm3leon.distributed import shard_model

            shard_model(self.model)
        if self.config.model.compile:
            self.model.compile()
        loss_fn: nn.Module = _Loss(self.model)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            loss_fn = DistributedDataParallel(loss_fn, device_ids=ids)
        return loss_fn

    def _log(self, message: str) -> None:
        if self.runtime.is_main:
            tqdm.write(message)

    def _autocast(self):
        if self.config.model.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_grads(self, enabled: bool):
        """Gradient all-reduce only on the last micro-batch of a step."""
        mode = self.config.parallel.mode
        if mode == "ddp" and not enabled:
            return self.loss_fn.no_sync()
        if mode == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    # ---- one step -----------------------------------------------------------------------------------------
    def _to_device(self, batch) -> tuple[torch.Tensor, ...]:
        d = self.device
        return (batch.tokens.to(d), batch.targets.to(d), batch.loss_weights.to(d), batch.cu_seqlens.to(d))

    def train_step(self, batches: list) -> dict[str, float]:
        """One optimizer step over ``batches`` (this rank's micro-batches). Returns the global loss, gradient
        norm, LR and token counts; a non-finite loss or norm skips the update."""
        rt = self.runtime
        self.model.train()
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        weight = torch.tensor([float(sum(float(b.loss_weights.sum()) for b in batches))], dtype=torch.float64)
        rt.all_reduce(weight)
        # Each micro-batch's mean loss scaled by its share of the global weight; DDP/FSDP average gradients
        # over ranks, so x world_size turns that average back into the global sum.
        total_weight = max(float(weight), 1e-30)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for i, batch in enumerate(batches):
            tokens, targets, weights, cu = self._to_device(batch)
            share = float(weights.sum()) / total_weight
            with self._sync_grads(i == len(batches) - 1), self._autocast():
                loss = self.loss_fn(tokens, targets, weights, cu, batch.max_seqlen)
                (loss * (share * rt.world_size)).backward()
            loss_sum += loss.detach().double().cpu() * share
        rt.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip
                                                   if self.config.optim.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = float(loss_sum), float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        counts = torch.tensor([sum(int(b.tokens.numel()) for b in batches),
                               sum(int(b.padding) for b in batches)], dtype=torch.float64)
        rt.all_reduce(counts)
        return {"loss": loss_value, "grad_norm": norm_value, "lr": lr, "tokens": int(counts[0]),
                "padding": int(counts[1]), "skipped": not finite}

    # ---- validation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        """Weighted validation loss over ``logging.val_batches`` batches of the held-out documents (the same
        batches every time)."""
        if self.data.validation is None:
            return None
        self.model.eval()
        loader = make_loader(self.data.validation, self.config, seed=self.config.seed + 1,
                             rank=self.runtime.rank, world_size=self.runtime.world_size)
        sums = torch.zeros(2, dtype=torch.float64)
        for _, batch in zip(range(self.config.logging.val_batches), loader):
            tokens, targets, weights, cu = self._to_device(batch)
            with self._autocast():
                loss = self.model.loss(tokens, targets, weights, cu_seqlens=cu, max_seqlen=batch.max_seqlen)
            w = float(weights.sum())
            sums += torch.tensor([float(loss) * w, w], dtype=torch.float64)
        self.runtime.all_reduce(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else None

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Writes ``checkpoints/step-N`` for the current step."""
        trainer_state = {"step": self.step, "tokens": self.tokens, "bad_steps": self.bad_steps,
                         "skipped_steps": self.skipped_steps, "config": self.config.to_json()}
        rank_state = {"rng": rng_state(), "loader": self.loader.state_dict()}
        path = self.checkpoints.save(self.step, self.model, self.optimizer, trainer_state, rank_state)
        self._log(f"checkpoint {path}")
        return path

    def resume(self) -> bool:
        """Restores the newest usable checkpoint; False when there is none (training starts afresh)."""
        restored = self.checkpoints.load_latest(self.model, self.optimizer, log=self._log)
        if restored is None:
            self._log(f"no checkpoint under {self.checkpoints.root}: starting from step 0")
            return False
        trainer_state = restored.trainer
        self.step, self.tokens = trainer_state["step"], trainer_state["tokens"]
        self.bad_steps, self.skipped_steps = trainer_state["bad_steps"], trainer_state["skipped_steps"]
        if restored.rank is not None:
            set_rng_state(restored.rank["rng"])
        if trainer_state["world_size"] == self.runtime.world_size:
            self.loader.load_state_dict(restored.rank["loader"])
        else:
            # Weights and optimizer state were resharded by DCP; the loader hands out exactly the examples
            # no old rank consumed (RNG streams of ranks that did not exist before start from the seed).
            self.loader.reshard_from([state["loader"] for state in restored.all_ranks])
            self._log(f"resumed a {trainer_state['world_size']}-process checkpoint on "
                      f"{self.runtime.world_size} processes")
        return True

    def export(self, path: Path | None = None) -> Path:
        """Writes the weights with :func:`cm3leon.save` (plus the tokenizer files beside them) for generation;
        rank 0 writes, every rank must call."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        path = path or self.out_dir / "model.safetensors"
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)
        if self.runtime.is_main:
            with torch.device("meta"):
                plain = CM3Leon(self.arch)
            plain = plain.to_empty(device="cpu")
            plain.load_state_dict(full)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(plain, path)
            for file in self.data.tokenizer_files:
                (path.parent / file.name).write_bytes(file.read_bytes())
            self._log(f"exported {path}")
        self.runtime.barrier()
        return path

    # ---- the loop -----------------------------------------------------------------------------------------
    def _peak(self) -> float:
        if self._peak_flops is None:
            dtype = torch.bfloat16 if self.config.model.precision == "bf16" and self.device.type == "cuda" \
                else torch.float32
            self._peak_flops = matmul_peak_flops(self.device, dtype)
        return self._peak_flops

    def fit(self, *, resume: bool = False) -> dict[str, Any]:
        """Trains to ``schedule.steps`` (from the newest checkpoint with ``resume``). Returns a summary:
        final step, tokens, last losses, skipped steps, the signal that interrupted the run (or None) and
        the wall time of the call in seconds."""
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        if resume:
            self.resume()
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", tensorboard=cfg.logging.tensorboard) \
            if rt.is_main else None
        if metrics is not None:
            metrics.truncate_after(self.step)
            (self.out_dir / "config.toml").write_text(cfg.to_toml())
        peak = self._peak()
        batches = iter(self.loader)
        bar = tqdm(total=cfg.schedule.steps, initial=self.step, desc=cfg.stage, unit="step",
                   disable=not (cfg.logging.progress and rt.is_main))
        last: dict[str, Any] = {}
        interrupted = None
        window = {"time": 0.0, "tokens": 0, "padding": 0, "flops": 0.0, "steps": 0}
        try:
            with _StopSignals() as signals:
                while self.step < cfg.schedule.steps:
                    t0 = time.perf_counter()
                    micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
                    result = self.train_step(micro)
                    self.step += 1
                    self.tokens += result["tokens"]
                    flops = sum(train_flops(self.arch, b.cu_seqlens) for b in micro)
                    window["time"] += time.perf_counter() - t0
                    window["tokens"] += result["tokens"]
                    window["padding"] += result["padding"]
                    window["flops"] += flops * rt.world_size
                    window["steps"] += 1
                    if result["skipped"]:
                        self._log(f"step {self.step}: non-finite loss {result['loss']} / grad norm "
                                  f"{result['grad_norm']}: update skipped ({self.bad_steps} in a row)")
                        if self.bad_steps >= cfg.optim.max_bad_steps:
                            raise NonFiniteLossError(
                                f"{self.bad_steps} consecutive steps with a non-finite loss or gradient norm "
                                f"(last at step {self.step}); lower optim.lr, check the data, or resume from "
                                "an earlier checkpoint")
                    last = {"step": self.step, "loss": result["loss"], "lr": result["lr"]}
                    record = None
                    if self.step % cfg.logging.every == 0 or self.step == cfg.schedule.steps:
                        seconds = max(window["time"], 1e-9)
                        record = {"step": self.step, "loss": result["loss"], "lr": result["lr"],
                                  "grad_norm": result["grad_norm"], "tokens": self.tokens,
                                  "tokens_per_s": window["tokens"] / seconds,
                                  "padding": window["padding"] / max(1, window["tokens"] + window["padding"]),
                                  "mfu": window["flops"] / seconds / (peak * rt.world_size),
                                  "skipped_steps": self.skipped_steps}
                        window = dict.fromkeys(window, 0)
                    if cfg.logging.val_every and self.step % cfg.logging.val_every == 0:
                        val = self.validate()
                        if val is not None:
                            record = {**(record or {"step": self.step}), "val_loss": val}
                            last["val_loss"] = val
                    if record is not None and metrics is not None:
                        metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{result['lr']:.2e}")
                    stop = torch.tensor([float(signals.stop or 0)])
                    rt.all_reduce(stop, op=torch.distributed.ReduceOp.MAX if rt.distributed else None)
                    every = cfg.checkpoint.every
                    if stop.item() or (every and self.step % every == 0) or self.step == cfg.schedule.steps:
                        self.save_checkpoint()
                    if signals.plot and metrics is not None:
                        signals.plot = False
                        plot_metrics(metrics.path, self.out_dir / "loss.png")
                    if stop.item():
                        interrupted = int(stop.item())
                        self._log(f"stopped by signal {interrupted} at step {self.step}; checkpoint saved, "
                                  "continue with --resume")
                        break
            if interrupted is None and cfg.checkpoint.export:
                self.export()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
                if cfg.logging.plot and metrics.path.is_file():
                    plot_metrics(metrics.path, self.out_dir / "loss.png")
        return {**last, "step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "interrupted": interrupted, "seconds": time.perf_counter() - started}

    def close(self) -> None:
        """Leaves the process group if the trainer created it."""
        self.runtime.close()
