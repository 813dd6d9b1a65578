"""The prompt builders emit exactly the training layouts: image prompts + the target image are the codec's
document, and infill prompts + their spans restore (``cm3_restore``) to the document they were made from."""
from __future__ import annotations

import pytest
import torch
from pipeline_fixtures import WORLD, parts

from cm3leon.data.tasks import make_example
from cm3leon.objective import cm3_restore
from cm3leon.pipeline import PromptBuilder
from cm3leon.tokenizer import tokenize_images


@pytest.fixture(scope="module")
def setup():
    _, codec, images = parts()
    return PromptBuilder(codec), codec, images


def _document(example, images, codec) -> list[int]:
    return codec.encode(tokenize_images([example.segments()], images)[0])


def _grid(image, images):
    return images.encode(image[None])[0]


def test_text_to_image_layout_with_retrieved_documents(setup):
    builder, codec, _ = setup
    v = codec.vocabulary
    r1, r2 = codec.encode(["a small red circle"]), codec.encode(["a large blue square"])
    prompt = builder.text_to_image("a red circle", [r1, r2])
    assert prompt.conditional == [v.eos_id, *r1, v.eos_id, *r2, v.eos_id, *codec.encode_segment("a red circle"),
                                  v.break_id]
    assert builder.text_to_image("a red circle").conditional == codec.text_to_image_prompt("a red circle")
    assert prompt.unconditional == [v.eos_id, v.mask_id, v.break_id]
    assert prompt.image_conditional is None


@pytest.mark.parametrize("task", ["edit", "segmentation", "edges", "grounded"])
def test_image_task_prompts_plus_the_target_image_are_the_training_document(setup, task):
    builder, codec, images = setup
    v = codec.vocabulary
    example = make_example(WORLD, 5, task)
    document = _document(example, images, codec)
    if task == "edit":
        prompt = builder.edit(_grid(example.before, images), example.instruction)
        target = example.after
    elif task == "grounded":
        prompt = builder.grounded([(o.describe(), o.box) for o in example.scene.objects])
        target = example.image
    else:
        prompt = builder.structure(_grid(example.condition, images), task, example.caption)
        target = example.image
    assert prompt.conditional + codec.encode_segment(_grid(target, images)) == [v.eos_id, *document]
    # the guidance streams keep the task's words and mask the conditioning
    assert prompt.unconditional[0] == v.eos_id and v.mask_id in prompt.unconditional
    assert prompt.unconditional[-1] == v.break_id
    if task == "edit":
        head = codec.encode_segment(example.segments()[0])
        grid = codec.encode_segment(_grid(example.before, images))
        assert prompt.image_conditional == [v.eos_id, *head, v.break_id, *grid, v.break_id, v.mask_id, v.break_id]
        assert prompt.unconditional == [v.eos_id, *head, v.break_id, v.mask_id, v.break_id, v.mask_id, v.break_id]


def test_caption_and_vqa_prompts_restore_to_the_training_document(setup):
    builder, codec, images = setup
    v = codec.vocabulary
    example = make_example(WORLD, 2, "vqa")
    grid = _grid(example.image, images)
    prompt = builder.vqa(grid, example.question.question)
    span = codec.encode_segment(f" {example.question.answer}.")
    assert prompt[0] == v.eos_id and prompt[-2:] == [v.infill_id, v.sentinel_id(0)]
    assert cm3_restore(prompt[1:] + span, v) == _document(example, images, codec)

    cap = make_example(WORLD, 3, "text_to_image")
    prompt = builder.image_to_text(_grid(cap.image, images))
    assert cm3_restore(prompt[1:] + codec.encode_segment(cap.caption), v) == _document(cap, images, codec)
    sft = make_example(WORLD, 3, "caption")
    prompt = builder.image_to_text(_grid(sft.image, images), instruction="Describe the given picture.")
    assert cm3_restore(prompt[1:] + codec.encode_segment(f" {sft.caption}"), v) == _document(sft, images, codec)
    r = codec.encode(["a small red circle"])
    assert builder.image_to_text(grid, [r])[: len(r) + 2] == [v.eos_id, *r, v.eos_id]


def test_infill_prompt_moves_whitespace_into_spans(setup):
    builder, codec, images = setup
    v = codec.vocabulary
    grid = _grid(WORLD.images(1)[0], images)
    ids, n = builder.infill(["a large <mask> in the <mask>", grid])
    assert n == 2
    spans = [codec.encode_segment(" red circle"), codec.encode_segment(" center")]
    full = ids + [v.sentinel_id(0), *spans[0], v.sentinel_id(1), *spans[1]]
    assert ids[0] == v.eos_id and ids[-1] == v.infill_id
    assert cm3_restore(full[1:], v) == codec.encode(["a large red circle in the center", grid])


@pytest.mark.parametrize("call,match", [
    (lambda b, g: b.infill(["no span here"]), "no <mask> span"),
    (lambda b, g: b.infill(["<mask>" * 17]), "more than 16"),
    (lambda b, g: b.structure(g, "depth", "a red circle"), "kind must be"),
    (lambda b, g: b.grounded([("red circle", (1, 2, 3))]), r"objects\[0\]"),
    (lambda b, g: b.text_to_image("a", [[]]), r"retrieved\[0\] is an empty"),
    (lambda b, g: b.text_to_image(""), "caption is an empty string"),
    (lambda b, g: b.edit(torch.zeros(2, 2, dtype=torch.long), "x"), "image has grid shape"),
])
def test_bad_prompt_inputs_raise(setup, call, match):
    builder, _, images = setup
    with pytest.raises(ValueError, match=match):
        call(builder, _grid(WORLD.images(1)[0], images))
