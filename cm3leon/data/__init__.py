"""Data for cm3leon: the built-in procedural "shapes" world (scenes, captions, SFT tasks, an exact scorer
and task metrics, a fixed-network Fréchet distance), the real-data loader (image folder + captions), and
packed CM3 training batches (:class:`PackedLoader`, docs/objective.md). See docs/data.md."""

from cm3leon.data.datasets import ShapesCaptions
from cm3leon.data.edits import EDIT_KINDS, Edit, make_edit
from cm3leon.data.folder import ImageCaptionFolder, export_shapes_folder, load_image, read_captions
from cm3leon.data.frechet import FixedFeatureNet, feature_stats, frechet_distance, frechet_from_stats
from cm3leon.data.metrics import (
    answer_from_image,
    caption_match,
    grounding_iou,
    overlap_score,
    parse_caption,
    prompt_alignment,
)
from cm3leon.data.packing import CM3Source, ExampleSource, PackedBatch, PackedLoader, derive_seed
from cm3leon.data.scorer import read_scene, read_scenes
from cm3leon.data.shapes import (
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
from cm3leon.data.structure import edge_map, render_edges, render_segmentation, segmentation_mask
from cm3leon.data.tasks import TASKS, format_segments, make_example, sft_examples
from cm3leon.data.vqa import QUESTION_KINDS, Question, answer_question, make_question, vqa_accuracy

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
