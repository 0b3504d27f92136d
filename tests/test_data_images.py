"""The robust image loader on bad and odd inputs made in the test, and the packaged photos."""
from __future__ import annotations

import io
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
