"""The open_clip adapter and the image-text scorer."""
from __future__ import annotations

import pytest
import torch

from cm3leon.retrieval import ImageTextScorer, MemoryBank, OpenCLIPEncoder, RetrievalDocument, Retriever
from cm3leon.retrieval import embed_documents, import_open_clip

from retrieval_fixtures import WORLD, shapes_documents, tiny_encoder, tokenizer


def _open_clip():
    try:
        return import_open_clip()
    except ImportError as err:
        pytest.skip(str(err))


def test_open_clip_adapter_on_a_random_vit_b32(tmp_path):
    open_clip = _open_clip()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    path = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    encoder = OpenCLIPEncoder.from_file(path, "ViT-B-32")
    images = WORLD.images(2)  # 16x16, resized to 224 inside
    texts = ["a red circle in the center", "a small blue square at the top"]
    with torch.no_grad():
        got = encoder.encode_texts([encoder.text_tokenizer.encode(t) for t in texts])
        want = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(texts)), dim=-1)
        torch.testing.assert_close(got, want)  # our framing = open_clip's own tokenize
        emb = encoder.encode_images(images)
        dropped = encoder.encode_images(images, drop=0.2, generator=torch.Generator().manual_seed(0))
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(emb, dropped)
    docs = [RetrievalDocument(t, im) for t, im in zip(texts, images)]
    bank = MemoryBank(encoder.embed_dim)
    bank.add(docs, embed_documents(docs, encoder, encoder.text_tokenizer))
    found = Retriever(encoder, bank, encoder.text_tokenizer, max_score=1.0).retrieve(docs[:1], 1, by="both")
    assert found[0][0] is docs[0]


def test_adapter_reports_an_unusable_open_clip_clearly(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "open_clip":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    with pytest.raises(ImportError, match="open_clip adapter needs an importable open_clip.*torchvision::nms"):
        OpenCLIPEncoder.from_file("weights.safetensors")


def test_scorer_is_the_pairwise_cosine():
    enc, tok = tiny_encoder(), tokenizer()
    docs = shapes_documents(3)
    images, captions = torch.stack([d.image for d in docs]), [d.text for d in docs]
    with torch.no_grad():
        want = (enc.encode_images(images) * enc.encode_texts([tok.encode(c) for c in captions])).sum(-1)
    scorer = ImageTextScorer(enc, tok)
    torch.testing.assert_close(scorer.score(images, captions), want)
    with pytest.raises(ValueError, match="captions has 2 entries but images has 3"):
        scorer.score(images, captions[:2])
    with pytest.raises(ValueError, match=r"captions\[1\] must be a non-empty str"):
        scorer.score(images, [captions[0], "", captions[2]])
    with pytest.raises(TypeError, match="captions must be a sequence"):
        scorer.score(images, "abc")
    with pytest.raises(ValueError, match="images must be uint8"):
        scorer.score(images.float(), captions)
