"""Data for cm3leon: the built-in procedural "shapes" world (scenes, captions, SFT tasks, an exact scorer
and task metrics, a fixed-network Fréchet distance), the real-data loader (image folder + captions), and
packed CM3 training batches (:class:`PackedLoader`, docs/objective.md). See docs/data.md."""

from .datasets import ShapesCaptions
from .edits import EDIT_KINDS, Edit, make_edit
from .folder import ImageCaptionFolder, export_shapes_folder, load_image, read_captions
from .frechet import FixedFeatureNet, feature_stats, frechet_distance, frechet_from_stats
from .metrics import (
    answer_from_image,
    caption_match,
    grounding_iou,
    overlap_score,
    parse_caption,
    prompt_alignment,
)
from .packing import CM3Source, ExampleSource, PackedBatch, PackedLoader, derive_seed
from .scorer import read_scene, read_scenes
from .shapes import (
    BACKGROUND,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesWorld,
    caption,
    coverage,
    images_tensor,
    render,
    to_tensor,
)
from .structure import edge_map, render_edges, render_segmentation, segmentation_mask
from .tasks import TASKS, format_segments, make_example, sft_examples
from .vqa import QUESTION_KINDS, Question, answer_question, make_question, vqa_accuracy

__all__ = [
    "BACKGROUND", "CM3Source", "EDIT_KINDS", "ExampleSource", "PackedBatch", "PackedLoader", "derive_seed",
    "PALETTE", "POSITIONS", "QUESTION_KINDS", "SHAPES", "SIZES", "TASKS",
    "Edit", "FixedFeatureNet", "ImageCaptionFolder", "Question", "Scene", "ShapeObject", "ShapesCaptions",
    "ShapesWorld", "answer_from_image", "answer_question", "caption", "caption_match", "coverage",
    "edge_map", "export_shapes_folder", "feature_stats", "format_segments", "frechet_distance",
    "frechet_from_stats", "grounding_iou", "images_tensor", "load_image", "make_edit", "make_example",
    "make_question", "overlap_score", "parse_caption", "prompt_alignment", "read_captions", "read_scene",
    "read_scenes", "render", "render_edges", "render_segmentation", "segmentation_mask", "sft_examples",
    "to_tensor", "vqa_accuracy",
]
