"""MemoryBank (FAISS), RetrievalDocument and embed_documents."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cm3leon.integrity import CheckpointError
from cm3leon.retrieval import MemoryBank, RetrievalDocument, embed_documents
from cm3leon.retrieval import bank as bank_module

from retrieval_fixtures import shapes_documents, tiny_encoder, tokenizer


def _docs(n: int) -> list[RetrievalDocument]:
    """A mix of layouts: caption + image, caption only (with unicode), image only (another size)."""
    out = []
    for i in range(n):
        if i % 3 == 0:
            image = torch.full((3, 4, 4), i % 256, dtype=torch.uint8)
            out.append(RetrievalDocument(f"doc {i}", image, [i, i + 1]))
        elif i % 3 == 1:
            out.append(RetrievalDocument(f"dôc ✓ {i}", None, [i]))
        else:
            out.append(RetrievalDocument(None, torch.full((3, 8, 6), i % 256, dtype=torch.uint8)))
    return out


def _unit(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_search_matches_exact_inner_product(index):
    emb, queries = _unit(400), _unit(20, seed=1)
    bank = MemoryBank(16, index=index, nlist=4, nprobe=4)  # IVF probing every list is exact
    bank.add(_docs(400), emb)
    scores, indices = bank.search(queries, 5)
    want_scores, want_indices = (queries @ emb.T).topk(5)
    assert scores.shape == indices.shape == (20, 5) and indices.dtype == torch.int64
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    if index == "hnsw":  # approximate: nearly all neighbours found on this easy case
        assert (indices == want_indices).float().mean() > 0.9
    else:
        assert torch.equal(indices, want_indices)


def test_add_in_steps_and_documents_view():
    bank = MemoryBank(16)
    docs, emb = _docs(10), _unit(10)
    bank.add(docs[:4], emb[:4])
    bank.add(docs[4:], emb[4:])
    assert len(bank) == 10 and bank.documents[7] is docs[7]
    torch.testing.assert_close(bank.embeddings, emb)
    emb.zero_()  # the bank keeps its own copy
    assert bank.embeddings.abs().sum() > 0
    assert bank.search(_unit(10)[7:8], 1)[1].item() == 7


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, index):
    docs, emb = _docs(100), _unit(100)
    bank = MemoryBank(16, index=index, nlist=2, nprobe=1)
    bank.add(docs, emb)
    bank.save(tmp_path / "bank.st")
    back = MemoryBank.load(tmp_path / "bank.st")
    assert (back.kind, back.nlist, back.nprobe, len(back)) == (index, bank.nlist, 1, 100)
    for a, b in zip(docs, back.documents):
        assert a.text == b.text and a.token_ids == b.token_ids
        assert (a.image is None and b.image is None) or torch.equal(a.image, b.image)
    q = _unit(7, seed=2)
    for got, want in zip(back.search(q, 4), bank.search(q, 4)):
        assert torch.equal(got, want)
    MemoryBank(16, index=index).save(tmp_path / "empty.st")
    assert len(MemoryBank.load(tmp_path / "empty.st")) == 0


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "bank.st"
    bank = MemoryBank(16)
    bank.add(_docs(5), _unit(5))
    bank.save(path)
    bank.add(_docs(5), _unit(5, seed=3))

    def crash(tensors, filename, metadata=None):  # dies after writing part of the file
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        bank.save(path)
    assert len(MemoryBank.load(path)) == 5  # the previous bank is intact
    assert [p.name for p in tmp_path.iterdir()] == ["bank.st"]  # no temporary file left behind


def test_truncated_damaged_or_foreign_file_raises_naming_it(tmp_path):
    bank = MemoryBank(16)
    bank.add(_docs(20), _unit(20))
    bank.save(tmp_path / "bank.st")
    data = (tmp_path / "bank.st").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.st").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.st: not a readable safetensors file"):
            MemoryBank.load(tmp_path / "cut.st")
    flipped = bytearray(data)
    flipped[-40] ^= 0xFF  # inside the last tensor's bytes
    (tmp_path / "flip.st").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"flip\.st: tensor .* fails its checksum"):
        MemoryBank.load(tmp_path / "flip.st")
    assert len(MemoryBank.load(tmp_path / "flip.st", verify=False)) == 20
    tiny_encoder().save(tmp_path / "enc.st")
    with pytest.raises(CheckpointError, match=r"enc\.st: is not a memory bank file"):
        MemoryBank.load(tmp_path / "enc.st")
    with pytest.raises(FileNotFoundError, match="missing.st"):
        MemoryBank.load(tmp_path / "missing.st")


@pytest.mark.parametrize("row", [5, -2])
def test_file_pointing_at_a_missing_image_raises(tmp_path, row):
    # checksums only prove the file is as written: a writer's bad image index escaped as IndexError (or,
    # negative, silently gave another document's image)
    from safetensors import safe_open

    from cm3leon.integrity import save_tensor_file

    bank = MemoryBank(16)
    bank.add(_docs(6), _unit(6))
    bank.save(tmp_path / "bank.st")
    with safe_open(str(tmp_path / "bank.st"), framework="pt") as f:
        tensors, params = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()["params"]
    tensors["image_row"][0] = row
    save_tensor_file(tmp_path / "bad.st", tensors, kind=bank_module._FORMAT, metadata={"params": params})
    with pytest.raises(CheckpointError, match=r"bad\.st: inconsistent memory bank contents .*document 0"):
        MemoryBank.load(tmp_path / "bad.st")


def test_bad_input_names_the_argument():
    bank = MemoryBank(16)
    with pytest.raises(ValueError, match="bank is empty"):
        bank.search(_unit(1), 1)
    bank.add(_docs(3), _unit(3))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        bank.search(_unit(1), 4)
    with pytest.raises(ValueError, match="k must be"):
        bank.search(_unit(1), 0)
    with pytest.raises(ValueError, match=r"queries must have shape \[N, 16\]"):
        bank.search(_unit(1, dim=8), 1)
    with pytest.raises(ValueError, match="queries contains NaN"):
        bank.search(torch.full((1, 16), float("nan")), 1)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[N, 16\]"):
        bank.add(_docs(2), _unit(2, dim=8))
    bad = _unit(2)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        bank.add(_docs(2), bad)
    with pytest.raises(ValueError, match="embeddings has 2 rows but documents has 3"):
        bank.add(_docs(3), _unit(2))
    with pytest.raises(TypeError, match=r"documents\[0\] must be a RetrievalDocument"):
        bank.add(["text"], _unit(1))
    with pytest.raises(ValueError, match="index must be one of"):
        MemoryBank(16, index="lsh")
    with pytest.raises(ValueError, match="dim must be"):
        MemoryBank(0)
    with pytest.raises(ValueError, match="needs at least 8 embeddings"):
        MemoryBank(16, index="ivf", nlist=8).add(_docs(3), _unit(3))
    assert len(bank) == 3  # nothing half-added


def test_documents_validate_their_fields():
    with pytest.raises(ValueError, match="both text and image are None"):
        RetrievalDocument(None, None)
    with pytest.raises(ValueError, match="image must be uint8"):
        RetrievalDocument("a", torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="text must be a non-empty"):
        RetrievalDocument("", None)
    with pytest.raises(TypeError, match="token_ids"):
        RetrievalDocument("a", None, (1, 2))


def test_embed_documents_averages_normalised_modalities():
    enc, tok = tiny_encoder(), tokenizer()
    full = shapes_documents(3)
    docs = [full[0], RetrievalDocument(full[1].text, None), RetrievalDocument(None, full[2].image)]
    got = embed_documents(docs, enc, tok, batch_size=2)
    with torch.no_grad():
        text = enc.encode_texts([tok.encode(d.text) for d in full])
        image = enc.encode_images(torch.stack([d.image for d in full]))
    torch.testing.assert_close(got, torch.stack([(text[0] + image[0]) / 2, text[1], image[2]]))
    with pytest.raises(TypeError, match=r"docs\[1\] must be a RetrievalDocument"):
        embed_documents([full[0], "text"], enc, tok)
    with pytest.raises(ValueError, match="batch_size"):
        embed_documents(full, enc, tok, batch_size=0)


def test_gpu_index_only_with_gpus(monkeypatch):
    monkeypatch.setattr(bank_module._faiss(), "get_num_gpus", lambda: 0)
    assert not MemoryBank(16).on_gpu
    with pytest.raises(ValueError, match="use_gpu=True but FAISS sees no GPU"):
        MemoryBank(16, use_gpu=True)
