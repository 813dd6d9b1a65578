"""Scorer accuracy (ground truth and degraded images), task metrics and the fixed-network Fréchet distance."""

import numpy as np
import pytest
import torch

from cm3leon.data import (
    FixedFeatureNet,
    ShapesWorld,
    answer_from_image,
    caption,
    caption_match,
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    grounding_iou,
    make_question,
    prompt_alignment,
    read_scene,
    read_scenes,
    render,
    to_tensor,
    vqa_accuracy,
)
from cm3leon.data.metrics import attributes
from cm3leon.data.scorer_eval import degrade, scorer_accuracy
from cm3leon.data.shapes import Scene


@pytest.mark.parametrize("size,n", [(32, 600), (64, 200)])
def test_scorer_reads_ground_truth_images(size, n):
    assert scorer_accuracy(ShapesWorld(size, seed=1000 + size), n) >= 0.99


@pytest.mark.parametrize("size,sigma,noise", [(32, 0.7, 8.0), (32, 1.0, 12.0), (64, 1.0, 12.0)])
def test_scorer_tolerates_blur_and_noise(size, sigma, noise):
    world = ShapesWorld(size, seed=77)
    assert scorer_accuracy(world, 150, sigma=sigma, noise=noise) >= 0.97


def test_scorer_tolerates_a_tinted_background_and_colour_cast():
    """Decoders shift colours: a dimmed background (-15) plus a per-image colour cast of up to +-10."""
    world = ShapesWorld(32, seed=21)
    n = 200
    x = world.images(n).float()
    g = torch.Generator().manual_seed(0)
    background = x.min(dim=1, keepdim=True).values >= 250
    y = torch.where(background, x - 15, x) + (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * 10
    y = degrade(y.clamp(0, 255).to(torch.uint8), sigma=0.8, noise=8, seed=1)
    correct = sum(list(map(attributes, read_scene(img).objects)) == list(map(attributes, s.objects))
                  for img, s in zip(y, world.scenes(n)))
    assert correct / n >= 0.97


def test_degrade():
    x = ShapesWorld(32, seed=0).images(3)
    assert torch.equal(degrade(x), x.float() / 255)
    blurred = degrade(x, sigma=1.0)
    assert blurred.shape == x.shape and (blurred - x.float() / 255).abs().max() > 0.2
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.float().mean(dim=(2, 3)) / 255, atol=2e-3)  # mass kept
    noisy = degrade(x, noise=10.0, seed=1)
    assert torch.equal(noisy, degrade(x, noise=10.0, seed=1)) and not torch.equal(noisy, degrade(x, noise=10.0))


def test_scorer_input_layouts_agree():
    scene = ShapesWorld(32, seed=3).scene(5)
    hwc = render(scene)
    chw = to_tensor(hwc)
    ref = read_scene(hwc)
    assert ref.objects and read_scene(chw) == ref == read_scene(chw.float() / 255)
    assert read_scenes(chw[None].expand(2, -1, -1, -1)) == [ref, ref]
    with pytest.raises(ValueError, match="3, H, W"):
        read_scene(chw[:2])
    with pytest.raises(TypeError, match="uint8 or floating"):
        read_scene(chw.int())
    with pytest.raises(ValueError, match="square"):
        read_scene(chw[:, :, :20])


def test_scorer_reads_a_blank_image_as_empty():
    assert read_scene(torch.full((3, 32, 32), 255, dtype=torch.uint8)).objects == ()


def test_prompt_alignment():
    world = ShapesWorld(32, seed=8)
    multi = next(s for s in world.scenes(50) if len(s.objects) == 3)
    img = render(multi)
    assert prompt_alignment(img, multi) == 1.0
    fewer = Scene(32, multi.objects[:2])  # the image shows an extra object
    assert prompt_alignment(img, fewer) == pytest.approx(2 / 3)
    assert prompt_alignment(render(fewer), multi) == pytest.approx(2 / 3)  # one missing
    other = next(s for s in world.scenes(50)
                 if not set(map(attributes, s.objects)) & set(map(attributes, multi.objects)))
    assert prompt_alignment(render(other), multi) == 0.0


def test_caption_match():
    scene = next(s for s in ShapesWorld(32, seed=2).scenes(50) if len(s.objects) == 2)
    text = caption(scene)
    assert caption_match(text, scene) == 1.0
    assert caption_match(text.upper(), scene) == 1.0
    a = scene.objects[0]
    assert caption_match(f"a {a.colour} {a.shape} " + text.split(a.shape, 1)[1].split(" and ")[0].strip(),
                         scene) == 0.5  # size omitted still matches; the other object is missing
    wrong = text.replace(a.colour, "blue" if a.colour != "blue" else "red", 1)
    assert caption_match(wrong, scene) == 0.5
    assert caption_match("a picture of nothing", scene) == 0.0
    with pytest.raises(TypeError, match="text must be a str"):  # was an AttributeError on .lower
        caption_match(None, scene)


def test_vqa_accuracy_and_answers_from_images():
    world = ShapesWorld(32, seed=12)
    qs = [make_question(world.scene(i), np.random.default_rng(i)) for i in range(60)]
    preds = [answer_from_image(render(world.scene(i)), q.question) for i, q in enumerate(qs)]
    assert vqa_accuracy(preds, [q.answer for q in qs]) == 1.0
    assert vqa_accuracy(["The Red.", "no"], ["red", "yes"]) == 0.5
    with pytest.raises(ValueError, match="length"):
        vqa_accuracy(["a"], [])
    with pytest.raises(TypeError, match="predictions must be a list"):  # scored letter by letter: 2/3
        vqa_accuracy("rod", "red")


def test_grounding_iou():
    world = ShapesWorld(64, seed=5)
    ious = [grounding_iou(render(s), s) for s in world.scenes(30)]
    assert min(ious) >= 0.75 and np.mean(ious) >= 0.9
    s = world.scene(0)
    assert grounding_iou(np.full((64, 64, 3), 255, np.uint8), s) == 0.0


def test_frechet_from_stats_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # diagonal covariances
    assert frechet_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, 3))
    s1, s2 = a @ a.T, b @ b.T  # general, and s2 singular
    eig = np.linalg.eigvals(s1 @ s2)  # real, >= 0 up to round-off
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum()
    assert frechet_from_stats(mu1, s1, mu1, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_from_stats(mu1, s1, mu1[:3], s2)


def test_feature_net_is_fixed():
    x = ShapesWorld(32, seed=0).images(4)
    f1, f2 = FixedFeatureNet()(x), FixedFeatureNet()(x)
    assert f1.shape == (4, 512) and torch.equal(f1, f2)
    assert torch.allclose(FixedFeatureNet()(x.float() / 255), f1)


def test_frechet_distance_separates_distributions():
    n = 400
    a, b = ShapesWorld(32, seed=0).images(n), ShapesWorld(32, seed=1).images(n)
    same = frechet_distance(a, b)
    stats_a = feature_stats(a)
    g = torch.Generator().manual_seed(0)
    shifted = {
        "channel swap": a[:, [1, 2, 0]],
        "noise": (a.float() + torch.randn(a.shape, generator=g) * 20).clamp(0, 255).to(torch.uint8),
        "one object": ShapesWorld(32, seed=2, max_objects=1).images(n),
        "blur": torch.nn.functional.avg_pool2d(a.float(), 3, 1, 1, count_include_pad=False).to(torch.uint8),
        "64px downscaled": torch.nn.functional.avg_pool2d(ShapesWorld(64, seed=3).images(n).float(), 2).to(
            torch.uint8),
    }
    for name, x in shifted.items():
        assert frechet_from_stats(*stats_a, *feature_stats(x)) > 1.8 * same, name
