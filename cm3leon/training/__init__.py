"""Training of cm3leon models: CM3 pretraining (retrieval-augmented when a memory bank is configured) and
SFT, on one process or under torchrun (DDP / FSDP2), with exact resume. See docs/training.md.

    python -m cm3leon.training --config demo-pretrain [--set optim.lr=3e-4 ...] [--resume]
"""
from .config import PRESETS, TrainingConfig, load_config
from .datasets import prepare_shapes_corpus
from .trainer import Trainer

__all__ = ["PRESETS", "Trainer", "TrainingConfig", "load_config", "prepare_shapes_corpus"]
