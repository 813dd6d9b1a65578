"""Real-data loader: image folder + captions.jsonl / .json round trips and errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.data import ImageCaptionFolder, ShapesCaptions, ShapesWorld, export_shapes_folder, load_image


def test_round_trip_through_a_png_folder(tmp_path):
    world = ShapesWorld(32, seed=3)
    export_shapes_folder(world, tmp_path, n=12, start=4)
    folder, ref = ImageCaptionFolder(tmp_path, image_size=32), ShapesCaptions(world, 12, start=4)
    assert len(folder) == len(ref) == 12
    for i in range(12):
        (img, text), (ref_img, ref_text) = folder[i], ref[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
        assert torch.equal(img, ref_img) and text == ref_text
    images, texts = next(iter(torch.utils.data.DataLoader(folder, batch_size=5)))
    assert images.shape == (5, 3, 32, 32) and len(texts) == 5


def test_resize_shorter_side_then_centre_crop(tmp_path):
    arr = np.zeros((20, 60, 3), np.uint8)  # 60 wide, 20 high: left third red, middle green, right blue
    arr[:, :20, 0] = arr[:, 20:40, 1] = arr[:, 40:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    Image.fromarray(arr[:, :20]).convert("L").save(tmp_path / "grey.png")
    img = load_image(tmp_path / "wide.png", 10)
    assert img.shape == (3, 10, 10)
    assert (img[1] > 200).all() and (img[0] < 50).all() and (img[2] < 50).all()  # only the centre survives
    grey = load_image(tmp_path / "grey.png", 16)
    assert grey.shape == (3, 16, 16) and torch.equal(grey[0], grey[1])


def test_json_list_and_blank_lines(tmp_path):
    export_shapes_folder(ShapesWorld(32, seed=1), tmp_path, n=3)
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    (tmp_path / "captions.jsonl").write_text("\n\n".join(lines) + "\n\n")
    assert len(ImageCaptionFolder(tmp_path)) == 3
    (tmp_path / "caps.json").write_text(json.dumps([json.loads(x) for x in lines]))
    folder = ImageCaptionFolder(tmp_path, image_size=16, captions="caps.json")
    assert len(folder) == 3 and folder[2][0].shape == (3, 16, 16)


def _write(tmp_path, *lines):
    export_shapes_folder(ShapesWorld(32, seed=0), tmp_path, n=2)
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")


GOOD = '{"image": "images/000000.png", "caption": "ok"}'


@pytest.mark.parametrize("bad,error,message", [
    ('{"image": "images/000000.png", "caption": ', ValueError, r"captions\.jsonl:2: invalid JSON"),
    ('["images/000000.png", "x"]', ValueError, r"captions\.jsonl:2: expected a JSON object"),
    ('{"image": "images/000000.png"}', ValueError, r"captions\.jsonl:2: missing key\(s\) \['caption'\]"),
    ('{"image": "images/000000.png", "caption": 3}', ValueError, r"captions\.jsonl:2: 'caption' must be a string"),
    ('{"image": "", "caption": "x"}', ValueError, r"captions\.jsonl:2: 'image' must be a non-empty string"),
    ('{"image": "images/nope.png", "caption": "x"}', FileNotFoundError, r"captions\.jsonl:2: image file not found"),
    ('{"image": "../escape.png", "caption": "x"}', ValueError, r"captions\.jsonl:2: .*stay inside"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad, error, message):
    _write(tmp_path, GOOD, bad)
    with pytest.raises(error, match=message):
        ImageCaptionFolder(tmp_path)


def test_missing_or_empty_captions_and_bad_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no entries"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "captions.jsonl").write_text('{"image": "broken.png", "caption": "x"}\n')
    folder = ImageCaptionFolder(tmp_path)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        folder[0]
    (tmp_path / "caps.json").write_text('{"image": "broken.png"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        ImageCaptionFolder(tmp_path, captions="caps.json")
    with pytest.raises(ValueError, match="image_size"):
        ImageCaptionFolder(tmp_path, image_size=0)


@pytest.mark.parametrize("separator", ["\u2028", "\x85"])
def test_unicode_line_separators_inside_captions_stay_in_their_line(tmp_path, separator):
    # json.dumps(ensure_ascii=False) writes these unescaped; str.splitlines() used to cut the entry in two
    entry = json.dumps({"image": "images/000000.png", "caption": f"a{separator}b"}, ensure_ascii=False)
    _write(tmp_path, entry, GOOD)
    folder = ImageCaptionFolder(tmp_path)
    assert [text for _, text in folder.items] == [f"a{separator}b", "ok"]


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    _write(tmp_path, GOOD)
    bad = b'{"image": "images/000000.png", "caption": "\xff"}'
    (tmp_path / "captions.jsonl").write_bytes(GOOD.encode() + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: not UTF-8"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "caps.json").write_bytes(b'[{"image": "images/000000.png", "caption": "\xff"}]')
    with pytest.raises(ValueError, match=r"caps\.json: not UTF-8"):
        ImageCaptionFolder(tmp_path, captions="caps.json")


def test_sizes_and_counts_must_be_ints(tmp_path):
    _write(tmp_path, GOOD)
    with pytest.raises(ValueError, match="image_size"):  # True used to give 1-pixel images
        ImageCaptionFolder(tmp_path, image_size=True)
    assert ImageCaptionFolder(tmp_path, image_size=np.int64(8))[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="size"):
        load_image(tmp_path / "images/000000.png", 0)
    with pytest.raises(ValueError, match="n must be"):  # used to write a captions file without entries
        export_shapes_folder(ShapesWorld(32, seed=0), tmp_path / "none", n=0)
