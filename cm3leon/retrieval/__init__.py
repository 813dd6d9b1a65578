"""Retrieval augmentation (CM3Leon): a dual encoder on cm3leon_kernels attention, a FAISS memory bank, and
the retrieval strategy (relevance, modality, diversity, query dropout). See docs/retrieval.md.

- :class:`RetrievalDocument` (``document.py``): a caption, an image, or both, plus its global ids.
- :class:`DualEncoder`, :class:`DualEncoderConfig` (``encoder.py``, ``config.py``, ``towers.py``) and
  :func:`train_dual_encoder` (``training.py``); :class:`OpenCLIPEncoder` (``openclip.py``) wraps ``open_clip``.
- :func:`embed_documents` (``embed.py``), :class:`MemoryBank` (``bank.py``), :class:`Retriever`
  (``retriever.py``), :class:`ImageTextScorer` (``scorer.py``).
- :class:`RetrievalAugmentedSource` and :func:`caption_image_documents` (``source.py``): training examples.
"""
from .bank import INDEX_KINDS, MemoryBank
from .config import DualEncoderConfig
from .document import RetrievalDocument
from .embed import embed_documents
from .encoder import DualEncoder, ImageTextEncoder
from .openclip import OpenCLIPEncoder, OpenCLIPTextTokenizer, import_open_clip
from .retriever import QUERY_MODES, Retriever
from .scorer import ImageTextScorer
from .source import RetrievalAugmentedSource, caption_image_documents
from .training import TrainResult, contrastive_loss, train_dual_encoder

__all__ = [
    "INDEX_KINDS", "QUERY_MODES", "DualEncoder", "DualEncoderConfig", "ImageTextEncoder", "ImageTextScorer",
    "MemoryBank", "OpenCLIPEncoder", "OpenCLIPTextTokenizer", "RetrievalAugmentedSource", "RetrievalDocument",
    "Retriever", "TrainResult", "caption_image_documents", "contrastive_loss", "embed_documents",
    "import_open_clip", "train_dual_encoder",
]
