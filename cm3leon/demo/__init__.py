"""The end-to-end demo behind ``make demo``: tokenizers, dual encoder and memory bank, retrieval-augmented CM3
pretraining, SFT, generation for every task and a report of which published claims hold on the shapes world.
See docs/demo.md."""
from .run import run_demo
from .scales import SCALES, DemoScale

__all__ = ["SCALES", "DemoScale", "run_demo"]
