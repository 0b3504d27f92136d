"""The robust image loader on bad and odd inputs made in the test, the packaged photos, and real
data set formats (Hugging Face image folders with metadata, COCO captions, LLaVA with an image
folder) built from tiny generated images, with missing and broken files among them."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from workbench.data.images import ImageError, load_image, packaged_image, packaged_image_names, packaged_images


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny IDAT and IEND (no real pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _noise_png(size=64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png.*0 bytes"):
        load_image(p)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_truncated_png(tmp_path):
    data = _noise_png()
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut.png.*truncated"):
        load_image(p)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes.png is not a readable image"):
        load_image(p)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="int"):
        load_image(3)  # type: ignore[arg-type]


def test_huge_dimension_header_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(100_000, 100_000))
    with pytest.raises(ImageError, match=r"bomb.png"):
        load_image(p)
    # Below Pillow's own bomb limit but above ours: our header check refuses it.
    p2 = tmp_path / "big.png"
    p2.write_bytes(_png_header(5000, 5000))
    with pytest.raises(ImageError, match=r"5000x5000 = 25,000,000 pixels"):
        load_image(p2, max_pixels=10_000_000)


def test_tiny_images(tmp_path):
    p = tmp_path / "pixel.png"
    Image.new("RGB", (1, 1), "red").save(p)
    with pytest.raises(ImageError, match=r"pixel.png is only 1x1"):
        load_image(p)
    small = Image.new("RGB", (4, 12), "red")
    with pytest.raises(ImageError, match="min_side"):
        load_image(small)
    assert load_image(small, min_side=4).size == (4, 12)


def test_modes_convert_to_rgb_properly(tmp_path):
    # L
    img = load_image(Image.new("L", (10, 10), 77))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)
    # LA: fully transparent -> white, opaque keeps the grey
    la = Image.new("LA", (10, 10), (0, 0))
    la.putpixel((0, 0), (50, 255))
    out = load_image(la)
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (50, 50, 50)
    # RGBA: half-transparent black over white -> mid grey
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 128))
    r, g, b = load_image(rgba).getpixel((0, 0))
    assert 120 <= r <= 135 and r == g == b
    # P with and without a transparent index
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    assert load_image(p).getpixel((0, 0)) == (200, 10, 20)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=1)
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    # CMYK (TIFF on disk): pure cyan
    cmyk = tmp_path / "cmyk.tif"
    Image.new("CMYK", (10, 10), (255, 0, 0, 0)).save(cmyk)
    assert load_image(cmyk).getpixel((0, 0)) == (0, 255, 255)
    # I;16: full 16-bit range scaled to 8 bits, from memory and from a 16-bit PNG file
    arr = np.array([[0, 32896, 65535] * 4] * 12, dtype=np.uint16)
    i16 = Image.fromarray(arr)  # uint16 -> mode I;16
    assert [load_image(i16).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    f16 = tmp_path / "deep.png"
    i16.save(f16)
    assert [load_image(f16).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_sources_and_ownership(tmp_path):
    data = _noise_png(32)
    from_bytes = load_image(data)
    p = tmp_path / "a.png"
    p.write_bytes(data)
    from_path = load_image(p)
    from_str = load_image(str(p))
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_path))
    assert np.array_equal(np.asarray(from_path), np.asarray(from_str))
    src = Image.new("RGB", (16, 16), "blue")
    out = load_image(src)
    assert out is not src
    out.putpixel((0, 0), (1, 2, 3))
    assert src.getpixel((0, 0)) == (0, 0, 255)


def test_packaged_images_are_real_photos():
    names = packaged_image_names()
    assert "grace_hopper" in names  # matplotlib is a dependency of the analysis extra
    photos = packaged_images()
    assert set(photos) == set(names)
    for img in photos.values():
        assert img.mode == "RGB" and min(img.size) >= 100
        assert np.asarray(img).std() > 20  # a photo, not a blank
    assert packaged_image("grace_hopper").size == (512, 600)
    with pytest.raises(ImageError, match="no packaged image named 'nope'"):
        packaged_image("nope")


# ----------------------------------------------------------------------------- real data set formats


def _write_png(path, colour: int, size: int = 24):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[..., colour % 3] = 200 + colour
    Image.fromarray(arr).save(path)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_image_folder_with_metadata_gives_labels_splits_captions_and_lazy_failures(tmp_path):
    from workbench.data import DatasetError, open_dataset

    root = tmp_path / "hf"
    for k in range(4):
        split = "train" if k < 3 else "validation"
        _write_png(root / split / f"img{k}.png", k)
    _write_png(root / "train" / "unlisted.png", 9)  # not in the metadata: not an item, as in `datasets`
    _jsonl(root / "train" / "metadata.jsonl", [
        {"file_name": f"img{k}.png", "colour": ["red", "green", "blue"][k], "score": k, "caption": f"picture {k}",
         "objects": {"bbox": [[0, 0, 1, 1]]}} for k in range(3)] + [
        {"file_name": "gone.png", "colour": "red", "score": 7, "caption": "a missing picture"}])
    (root / "validation" / "metadata.csv").write_text("file_name,colour,score\nimg3.png,red,3\n")
    ds = open_dataset(root)
    assert ds.kind == "folder" and ds.ids == sorted(["train/img0.png", "train/img1.png", "train/img2.png",
                                                     "train/gone.png", "validation/img3.png"])
    first = ds[ds.index_of("train/img1.png")]
    assert first.labels == {"colour": "green", "score": 1, "caption": "picture 1"}  # the nested column is dropped
    assert first.split == "train" and first.captions == ("picture 1",)
    assert ds[ds.index_of("validation/img3.png")].split == "val" and ds.splits == ["train", "val"]
    assert ds[ds.index_of("validation/img3.png")].labels == {"colour": "red", "score": 3}  # CSV numbers typed
    assert ds.labels("colour").count("red") == 3 and set(ds.label_names) == {"colour", "score", "caption"}
    # the listed but missing image is an item that fails when loaded, naming its path
    gone = ds.index_of("train/gone.png")
    with pytest.raises(ImageError, match=r"train/gone.png does not exist"):
        ds.load(gone)
    assert [it.id for it in ds.missing()] == ["train/gone.png"]
    # the metadata file names its folder
    assert open_dataset(root / "train" / "metadata.jsonl").ids == ["gone.png", "img0.png", "img1.png", "img2.png"]

    bad = tmp_path / "bad"
    _write_png(bad / "a.png", 0)
    (bad / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"label": 1}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl: line 2 has no \"file_name\""):
        open_dataset(bad)
    (bad / "metadata.jsonl").write_text('{"file_name": "a.png"\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl: line 1, column \d+: invalid JSON"):
        open_dataset(bad)
    (bad / "metadata.jsonl").write_text('{"file_name": "elsewhere/a.png"}\n')
    with pytest.raises(DatasetError, match="none of its 1 images exist"):
        open_dataset(bad)


def test_image_folder_without_metadata_labels_by_subfolder(tmp_path):
    from workbench.data import open_dataset

    for k, name in enumerate(["cat/1.png", "cat/2.png", "dog/3.png", "test/dog/4.png"]):
        _write_png(tmp_path / name, k)
    ds = open_dataset(tmp_path)
    assert [(it.id, it.labels.get("label"), it.split) for it in ds] == [
        ("cat/1.png", "cat", None), ("cat/2.png", "cat", None), ("dog/3.png", "dog", None),
        ("test/dog/4.png", "dog", "test")]
    _write_png(tmp_path / "loose.png", 5)  # one image outside any class folder: no folder labels at all
    assert open_dataset(tmp_path).label_names == []


def _coco(tmp_path, images, annotations, name="captions", **extra):
    path = tmp_path / "annotations" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations, **extra}))
    return path


def test_coco_captions_and_instances(tmp_path):
    from workbench.data import DatasetError, open_dataset

    folder = tmp_path / "val2017"
    for k in (1, 2):
        _write_png(folder / f"{k:012d}.jpg".replace(".jpg", ".png"), k)
    images = [{"id": k, "file_name": f"{k:012d}.png", "width": 24, "height": 24} for k in (1, 2, 3)]
    anns = [{"id": 11, "image_id": 1, "caption": " second by id "}, {"id": 5, "image_id": 1, "caption": "first"},
            {"id": 12, "image_id": 2, "caption": "only one"}]
    path = _coco(tmp_path, images, anns)
    with pytest.raises(DatasetError, match="none of its 3 images exist.*--image-folder"):
        open_dataset(path)  # the default folder (the JSON's own) holds none of them
    ds = open_dataset(path, image_folder=folder)
    assert ds.kind == "coco" and ds.ids == ["1", "2", "3"]
    assert ds[0].captions == ("first", "second by id") and ds.captions() == {"1": "first", "2": "only one"}
    assert ds.load(1).size == (24, 24)
    with pytest.raises(ImageError, match="000000000003.png does not exist"):
        ds.load(2)  # listed, missing: fails on load, not up front
    from workbench.pipelines.aligning import read_captions  # what `fvl align --data` pairs with the features

    assert read_captions(str(path), image_folder=str(folder)) == {"1": "first", "2": "only one"}

    inst = _coco(tmp_path, images[:2], name="instances", annotations=[
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]},
        {"id": 2, "image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 3, 3]}],
        categories=[{"id": 3, "name": "cat"}, {"id": 4, "name": "dog"}])
    ds = open_dataset(inst, image_folder=folder)
    assert [it.labels for it in ds] == [{"category": "dog", "n_objects": 2}, {"category": "cat", "n_objects": 1}]

    dangling = _coco(tmp_path, images[:1], [{"id": 1, "image_id": 99, "caption": "x"}], name="dangling")
    with pytest.raises(DatasetError, match="image_id 99, which is not in \"images\""):
        open_dataset(dangling, image_folder=folder)
    other = tmp_path / "other.json"
    other.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="neither COCO"):
        open_dataset(other)
    with pytest.raises(DatasetError, match="--image-folder .*nowhere does not exist"):
        open_dataset(path, image_folder=tmp_path / "nowhere")


def _llava_with_bad_items(tmp_path):
    folder = tmp_path / "images"
    for k in range(3):
        _write_png(folder / f"ok{k}.png", k)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]
    rows = [{"id": f"s{k}", "image": f"ok{k}.png", "conversations": turns} for k in range(3)]
    rows += [{"id": "m1", "image": "missing1.png", "conversations": turns},
             {"id": "m2", "image": "sub/missing2.png", "conversations": turns},
             {"id": "b", "image": "broken.png", "conversations": turns}]
    path = tmp_path / "llava" / "train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rows))
    return path, folder


def test_llava_with_image_folder_keeps_missing_images_as_items(tmp_path):
    from workbench.data import DatasetError, open_dataset

    path, folder = _llava_with_bad_items(tmp_path)
    with pytest.raises(DatasetError, match="none of its 6 images exist.*--image-folder"):
        open_dataset(path)
    ds = open_dataset(path, image_folder=folder)
    assert len(ds) == 6 and sorted(it.id for it in ds.missing()) == ["m1", "m2"]
    assert ds.captions()["s0"] == "A square."


def test_fvl_data_check_lists_every_bad_item(tmp_path, capsys):
    from workbench.cli import main as fvl

    path, folder = _llava_with_bad_items(tmp_path)
    assert fvl(["data", "check", str(path), "--image-folder", str(folder), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6 and sorted(b["id"] for b in report["bad"]) == ["b", "m1", "m2"]
    assert fvl(["data", "check", str(path), "--image-folder", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "3 of 6 images load; 3 bad" in out and "missing2.png does not exist" in out and "b: " in out
    # a wrong image folder: every item is listed, then the likely cause
    assert fvl(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "0 of 6 images load" in out and "pass --image-folder" in out
    assert fvl(["data", "info", str(path), "--image-folder", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "llava" and info["n"] == 6 and info["missing_images"] == 2 and info["with_captions"] == 6
