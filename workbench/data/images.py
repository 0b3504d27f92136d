"""Robust image loading, and the real photos that ship inside installed pip packages.

`load_image` is the one door through which files enter the models: whatever the mode
(L, LA, P, RGBA, CMYK, I;16, ...) it returns an 8-bit RGB image, and a file that would
crash or silently poison a batch (empty, truncated, not an image, a decompression bomb,
a 1x1 pixel) raises `ImageError` naming the file and what to do instead.

The size check reads only the header (`Image.open` is lazy), so a PNG that claims
100000 x 100000 pixels is refused before a single byte is decoded.
"""
from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; far above any model input, far below a bomb
DEFAULT_MIN_SIDE = 8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

ImageSource = Union[str, Path, bytes, bytearray, Image.Image]


class ImageError(ValueError):
    """An input that is not a usable image; the message names it and says what to do."""


def _name(src: ImageSource) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<PIL image {getattr(src, 'mode', '?')} {getattr(src, 'size', '?')}>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: alpha over white, 16/32-bit and float scaled to 0..255."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # full 16-bit range onto 0..255 (65535 / 257 = 255)
        elif mode == "F" and arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255.0
        elif arr.size and (arr.min() < 0 or arr.max() > 255):
            lo, hi = float(arr.min()), float(arr.max())  # unknown range: stretch what is there
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


PACKAGED_PREFIX = "packaged:"  # an image name that `load_image` resolves with `packaged_image`


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
               exif_transpose: bool = True) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a PIL image, or `ImageError`.

    `max_pixels` bounds width*height (checked from the header before decoding);
    `min_side` rejects images too small to mean anything (1x1 tracking pixels, icons).
    `packaged:NAME` is a real photo shipped inside an installed package (`packaged_image_names()`).
    """
    name = _name(src)
    if isinstance(src, str) and src.startswith(PACKAGED_PREFIX) and not Path(src).exists():
        return packaged_image(src[len(PACKAGED_PREFIX):])
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (str, Path)):
            path = Path(src)
            if not path.exists():
                raise ImageError(f"image {name} does not exist; check the path")
            if path.is_dir():
                raise ImageError(f"image {name} is a directory; give an image file (or open the folder as a dataset)")
            if path.stat().st_size == 0:
                raise ImageError(f"image {name} is an empty file (0 bytes); re-export or remove it")
            fp: io.BytesIO | Path = path
        elif isinstance(src, (bytes, bytearray)):
            if not src:
                raise ImageError("image bytes are empty (0 bytes); pass the encoded file contents")
            fp = io.BytesIO(bytes(src))
        else:
            raise ImageError(f"cannot load an image from a {type(src).__name__}; pass a path, bytes or a PIL image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
                img = Image.open(fp)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image {name} is a likely decompression bomb ({exc}); refusing to decode it") from None
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not a readable image (unknown or corrupt format); "
                             "check that it is a PNG/JPEG/... file and not text or a partial download") from None
        except OSError as exc:
            raise ImageError(f"cannot open image {name}: {exc}; re-export or remove the file") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image {name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                         "(a corrupt header or a decompression bomb); downscale it or raise max_pixels")
    if min(w, h) < min_side:
        raise ImageError(f"image {name} is only {w}x{h} pixels (minimum side {min_side}); "
                         "remove it or lower min_side")
    try:
        img.load()
        view = ImageOps.exif_transpose(img) if exif_transpose else img  # camera photos are stored rotated
        out = _to_rgb(view)
        if out is img:
            out = out.copy()  # never hand back the caller's object or one tied to an open file
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {name} cannot be decoded ({exc}); the file is probably truncated or corrupt - "
                         "re-download or re-export it") from None
    finally:
        if not isinstance(src, Image.Image):
            img.close()
    return out


@functools.lru_cache(maxsize=1)
def _packaged_sources() -> dict[str, tuple[str, object]]:
    """name -> (kind, locator) of the photos found in installed packages (nothing downloaded)."""
    found: dict[str, tuple[str, object]] = {}
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if path.is_file():
            found["grace_hopper"] = ("file", path)
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_image

        for fname in ("china.jpg", "flower.jpg"):
            found[fname.rsplit(".", 1)[0]] = ("sklearn", fname)
    except ImportError:
        pass
    try:
        import skimage.data  # noqa: F401  # optional: its photos are inside the wheel

        for key in ("astronaut", "chelsea", "coffee", "rocket"):
            found[key] = ("skimage", key)
    except ImportError:
        pass
    return dict(sorted(found.items()))


def packaged_image_names() -> list[str]:
    """Names accepted by `packaged_image`, for the packages installed here."""
    return list(_packaged_sources())


def packaged_image(name: str) -> Image.Image:
    """One real photo shipped inside an installed package, as RGB."""
    sources = _packaged_sources()
    if name not in sources:
        raise ImageError(f"no packaged image named {name!r}; available here: {', '.join(sources) or 'none'} "
                         "(matplotlib gives grace_hopper, scikit-learn china/flower, scikit-image astronaut/...)")
    kind, loc = sources[name]
    if kind == "file":
        return load_image(loc)  # type: ignore[arg-type]
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(loc)).convert("RGB")
    import skimage.data

    return load_image(Image.fromarray(getattr(skimage.data, loc)()))


def packaged_images() -> dict[str, Image.Image]:
    """All packaged photos available here, by name (sorted)."""
    return {name: packaged_image(name) for name in _packaged_sources()}
