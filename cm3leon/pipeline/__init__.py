"""Generation tasks of CM3Leon models (text -> image, captioning, VQA, infilling, editing, structure-guided and
grounded generation) and the checkpoint directory they load from. See docs/generation.md."""
from .bundle import Bundle, load_bundle, save_bundle
from .core import STRATEGIES, ImageDecoding, Pipeline
from .prompts import GuidedPrompt, PromptBuilder
from .results import ImageResult, InfillResult, rerank

__all__ = ["STRATEGIES", "Bundle", "GuidedPrompt", "ImageDecoding", "ImageResult", "InfillResult", "Pipeline",
           "PromptBuilder", "load_bundle", "rerank", "save_bundle"]
