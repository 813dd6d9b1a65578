"""The shapes evaluation's metrics and its bag-of-words / colour-histogram baseline."""
from __future__ import annotations

import itertools

import pytest
import torch

from cm3leon.data import POSITIONS, ShapesWorld, caption, images_tensor
from cm3leon.data.shapes import Scene, ShapeObject
from cm3leon.retrieval.baseline import BagOfWordsColourBaseline, colour_histograms
from cm3leon.retrieval.evaluate import chance_recall, recall, share_rates, shares


def test_recall_counts_any_correct_item_in_the_top_k():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3], [0.5, 0.9, 0.1]])
    same = torch.tensor([[False, True, False], [True, False, False], [False, True, True]])
    got = recall(sim, same, ks=(1, 2))
    assert abs(got[1] - 1 / 3) < 1e-6 and abs(got[2] - 2 / 3) < 1e-6


def test_chance_recall_matches_enumerating_every_ranking():
    same = torch.tensor([[True, False, False, False], [True, True, False, False], [False, False, False, True]])
    want = {}
    for k in (1, 2):
        hits = [[any(row[list(order)[:k]].tolist()) for order in itertools.permutations(range(4))] for row in same]
        want[k] = sum(sum(h) / len(h) for h in hits) / len(hits)
    got = chance_recall(same, ks=(1, 2))
    assert all(abs(got[k] - want[k]) < 1e-12 for k in (1, 2))


def test_recall_at_k_beyond_the_item_count_ranks_every_item():
    # A held-out set smaller than the largest k (evaluate --test 3) still has a top 5: all of its items.
    sim = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.1]])
    same = torch.tensor([[True, False, False], [False, False, True]])
    assert recall(sim, same, ks=(1, 5)) == {1: 0.0, 5: 1.0}
    assert chance_recall(same, ks=(1, 5)) == pytest.approx({1: 1 / 3, 5: 1.0})


def test_attribute_sharing():
    a = Scene(32, (ShapeObject("red", "circle", "top", "small", (0, 0, 4, 4)),))
    b = Scene(32, (ShapeObject("red", "square", "left", "large", (0, 0, 8, 8)),
                   ShapeObject("blue", "circle", "center", "small", (0, 0, 4, 4))))
    assert [shares(a, b, attr) for attr in ("colour", "shape", "position")] == [True, True, False]
    assert share_rates([(a, b), (a, a)]) == {"colour": 1.0, "shape": 1.0, "position": 0.5}


def test_colour_histograms_skip_the_background_and_locate_colour():
    world = ShapesWorld(image_size=24, seed=1, min_objects=1, max_objects=1)
    scene = world.scene(0)
    hist = colour_histograms(images_tensor([scene])).view(9, 64)
    cell = POSITIONS.index(scene.objects[0].position)
    assert hist.sum() > 0 and hist[cell].sum() == hist.sum()  # all foreground mass in the object's cell
    assert colour_histograms(torch.full((1, 3, 24, 24), 255, dtype=torch.uint8)).sum() == 0


def test_baseline_beats_chance_on_held_out_scenes():
    world = ShapesWorld(image_size=24, seed=2)
    train, test = world.scenes(400), world.scenes(60, start=400)
    baseline = BagOfWordsColourBaseline(images_tensor(train), [caption(s) for s in train])
    texts = [caption(s) for s in test]
    sim = baseline.embed_texts(texts) @ baseline.embed_images(images_tensor(test)).T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    assert recall(sim, same)[5] > 5 * chance_recall(same)[5]
