"""Train the demo dual encoder on shapes scenes and measure retrieval on held-out scenes.

Usage::

    python -m cm3leon.retrieval.evaluate [--train 4000] [--test 500] [--steps 1500] [--minutes 20] [--out r.json]

Reports Recall@1 / @5 for text->image and image->text over the held-out scenes, for the trained encoder, for
a bag-of-words / colour-histogram baseline (:mod:`cm3leon.retrieval.baseline`) and for chance. A hit is a
retrieved item whose caption equals the query's (two scenes with the same caption are indistinguishable by
text). It also reports how often the documents the :class:`Retriever` returns (bank = the held-out scenes, k
= 2, the query itself skipped by the 0.9 rule) share a colour, a shape or a position with the query, against
the rate for random pairs.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch

from cm3leon.data import ShapesWorld, caption, images_tensor
from cm3leon.data.shapes import Scene
from cm3leon.tokenizer import TextTokenizer

from .bank import MemoryBank
from .baseline import BagOfWordsColourBaseline
from .config import DualEncoderConfig
from .document import RetrievalDocument
from .embed import embed_documents, encode_captions
from .retriever import Retriever
from .training import train_dual_encoder

ATTRIBUTES = ("colour", "shape", "position")
KS = (1, 5)


def recall(sim: torch.Tensor, same: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """Fraction of queries (rows of ``sim`` [Q, T]) with a correct item (``same`` [Q, T]) in their top k (all
    ``T`` items when k > T)."""
    top = sim.topk(min(max(ks), sim.shape[1]), dim=1).indices
    hits = same.gather(1, top)
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def chance_recall(same: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """Expected recall of a uniformly random ranking: ``1 - C(T - m, k) / C(T, k)`` averaged over queries with
    ``m`` correct items each."""
    t = same.shape[1]
    m = same.sum(dim=1).double()
    out = {}
    for k in ks:
        miss = torch.ones_like(m)
        for j in range(min(k, t)):  # a top k beyond the T items holds all of them
            miss = miss * (t - m - j).clamp(min=0) / (t - j)
        out[k] = float((1 - miss).mean())
    return out


def shares(a: Scene, b: Scene, attribute: str) -> bool:
    """Whether scenes ``a`` and ``b`` have an object with the same ``attribute`` value."""
    return bool({getattr(o, attribute) for o in a.objects} & {getattr(o, attribute) for o in b.objects})


def share_rates(pairs: Sequence[tuple[Scene, Scene]]) -> dict[str, float]:
    return {attr: sum(shares(a, b, attr) for a, b in pairs) / max(1, len(pairs)) for attr in ATTRIBUTES}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=4000, help="training scenes")
    parser.add_argument("--test", type=int, default=500, help="held-out scenes (after the training ones)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--minutes", type=float, default=20.0, help="stop training after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    world = ShapesWorld(image_size=32, seed=args.seed)
    train_scenes = world.scenes(args.train)
    test_scenes = world.scenes(args.test, start=args.train)
    train_images, test_images = images_tensor(train_scenes), images_tensor(test_scenes)
    train_captions = [caption(s) for s in train_scenes]
    test_captions = [caption(s) for s in test_scenes]
    tokenizer = TextTokenizer.train(train_captions, vocab_size=1024)

    config = DualEncoderConfig.preset("demo", text_vocab_size=tokenizer.vocab_size)
    pairs = list(zip(train_images, train_captions))
    result = train_dual_encoder(config, pairs, tokenizer, args.steps, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed, time_limit=60 * args.minutes)
    encoder = result.encoder

    same = torch.tensor([[a == b for b in test_captions] for a in test_captions])
    with torch.inference_mode():
        image_emb = encoder.encode_images(test_images)
        text_emb = encode_captions(encoder, tokenizer, test_captions)
    baseline = BagOfWordsColourBaseline(train_images, train_captions)
    base_image, base_text = baseline.embed_images(test_images), baseline.embed_texts(test_captions)
    table = {
        "dual encoder": {"text->image": recall(text_emb @ image_emb.T, same),
                         "image->text": recall(image_emb @ text_emb.T, same)},
        "bag-of-words / colour histogram": {"text->image": recall(base_text @ base_image.T, same),
                                            "image->text": recall(base_image @ base_text.T, same)},
        "chance": {"text->image": chance_recall(same), "image->text": chance_recall(same)},
    }

    docs = [RetrievalDocument(c, im) for c, im in zip(test_captions, test_images)]
    bank = MemoryBank(encoder.embed_dim)
    bank.add(docs, embed_documents(docs, encoder, tokenizer))
    retriever = Retriever(encoder, bank, tokenizer)
    position = {id(d): i for i, d in enumerate(docs)}
    attribute_rates = {}
    for by in ("both", "text", "image"):
        found = retriever.retrieve(docs, 2, by=by)
        attribute_rates[f"retriever by={by}, k=2"] = share_rates(
            [(test_scenes[q], test_scenes[position[id(d)]]) for q, row in enumerate(found) for d in row])
    top1 = (text_emb @ image_emb.T).argmax(dim=1).tolist()
    attribute_rates["text->image top-1"] = share_rates([(test_scenes[q], test_scenes[j]) for q, j in enumerate(top1)])
    g = torch.Generator().manual_seed(args.seed)
    random_pairs = torch.randint(0, args.test, (4 * args.test, 2), generator=g).tolist()
    attribute_rates["random pairs"] = share_rates([(test_scenes[a], test_scenes[b]) for a, b in random_pairs if a != b])

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
              "train_steps": result.history[-1]["step"] + 1, "train_seconds": round(result.seconds, 1),
              "final_loss": round(result.history[-1]["loss"], 4), "recall": table, "attributes": attribute_rates}
    _print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def _print(report: dict) -> None:
    print(f"\ntrained {report['train_steps']} steps in {report['train_seconds']} s, final loss {report['final_loss']}")
    print("\n| method | text->image R@1 | R@5 | image->text R@1 | R@5 |\n|---|---|---|---|---|")
    for name, r in report["recall"].items():
        t2i, i2t = r["text->image"], r["image->text"]
        print(f"| {name} | {t2i[1]:.3f} | {t2i[5]:.3f} | {i2t[1]:.3f} | {i2t[5]:.3f} |")
    print("\n| retrieved vs query | shares a colour | a shape | a position |\n|---|---|---|---|")
    for name, r in report["attributes"].items():
        print(f"| {name} | {r['colour']:.3f} | {r['shape']:.3f} | {r['position']:.3f} |")


if __name__ == "__main__":
    main()
