"""Image decoding and the checkpoint's resize/pad, done on the CPU in worker processes.

Decoding is where hostile data lives, so `decode_image` turns every failure into an
`ImageError` with a message fit for the output row. The geometric part of the
checkpoint's image processor (longest side to N, pad to a centred square) is
reproduced here on uint8 pixels with the processor's own settings, so that workers
ship 3 bytes per pixel and the float normalisation runs on the device.

Exactness: the result equals the processor's output bit for bit, except for JPEGs that
fast decoding shrank while decoding (draft mode; photos at least twice the view's side).
Their pixels already differ from a full decode, so they are also resized with torch's
antialiased bicubic on uint8 (within 3 of 255 levels of Pillow's, 3x faster: Pillow's resize was
half of a worker's time per image).
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; the message goes into the row's `error` column."""


_LIMIT: list[int | None] = [None]  # the limit `_bomb_check` applies (one per decoder process)


def _bomb_check(size: tuple[int, int], error_only: bool = False) -> None:
    """Stands in for Pillow's `Image._decompression_bomb_check`, with its signature: plugins
    call it with `error_only=True` (WebP); ours only ever raises, so that changes nothing."""
    limit = _LIMIT[0]
    if limit is not None and size[0] * size[1] > limit:
        raise ImageError(f"image too large: {size[0]}x{size[1]} pixels exceeds the limit of {limit}")


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int):
    """Pillow's decompression-bomb check made ours, truncated files refused, while decoding;
    Pillow's own settings are restored afterwards (nothing changes at import either).

    Pillow checks the size of every image it opens before decoding it: the outer file at
    `Image.open`, and the frames containers open themselves (a 30000x30000 PNG inside an
    ICO or ICNS). Its check is replaced by one that applies our limit with our message,
    so no container is decoded before its frames were measured. `MAX_IMAGE_PIXELS` is set
    to the limit too (its warning is raised as an error in `decode_image_drafted`), for
    any reader that checks the constant itself.
    """
    saved = (_LIMIT[0], Image.MAX_IMAGE_PIXELS, Image._decompression_bomb_check, ImageFile.LOAD_TRUNCATED_IMAGES)  # type: ignore[attr-defined]
    _LIMIT[0] = max_pixels
    Image.MAX_IMAGE_PIXELS = max_pixels
    Image._decompression_bomb_check = _bomb_check  # type: ignore[attr-defined]
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        _LIMIT[0], Image.MAX_IMAGE_PIXELS, Image._decompression_bomb_check, ImageFile.LOAD_TRUNCATED_IMAGES = saved  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ImageView:
    """One tensor the vision tower takes, e.g. 384px `pixel_values` or 1024px `high_res_pixel_values`.

    `source` names the view this one is resized from (the 7B hybrid derives its
    low-res view from the padded high-res one), or None for the decoded image.
    """

    name: str
    size: int
    min_size: int
    resample: int
    background: tuple[int, int, int]
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str | None = None


def _triple(value) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _side(size) -> int:
    if isinstance(size, dict):
        return int(size.get("height") or size.get("shortest_edge") or size.get("longest_edge"))
    return int(getattr(size, "height", None) or size)


def views_from_image_processor(processor) -> list[ImageView]:
    """Read the resize/pad/normalise settings of a DeepSeek-VL (or hybrid) image processor."""
    rescale = float(getattr(processor, "rescale_factor", 1 / 255))
    min_size = int(getattr(processor, "min_size", 14))
    low = ImageView(
        name="pixel_values",
        size=_side(processor.size),
        min_size=min_size,
        resample=int(processor.resample),
        background=tuple(int(c) for c in getattr(processor, "background_color", (127, 127, 127))),  # type: ignore[arg-type]
        rescale_factor=rescale,
        mean=_triple(processor.image_mean),
        std=_triple(processor.image_std),
    )
    if getattr(processor, "high_res_size", None) is None:
        return [low]
    high = ImageView(
        name="high_res_pixel_values",
        size=_side(processor.high_res_size),
        min_size=min_size,
        resample=int(processor.high_res_resample),
        background=tuple(int(c) for c in processor.high_res_background_color),  # type: ignore[arg-type]
        rescale_factor=rescale,
        mean=_triple(processor.high_res_image_mean),
        std=_triple(processor.high_res_image_std),
    )
    return [high, ImageView(**{**low.__dict__, "source": high.name})]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fitted_size(width: int, height: int, side: int, min_size: int) -> tuple[int, int]:
    """The processor's rule: longest side to `side`, the other scaled, never below min_size."""
    delta = side / max(width, height)
    return max(round(width * delta), min_size), max(round(height * delta), min_size)


def decode_image(data: bytes, max_pixels: int, draft_side: int | None = None) -> Image.Image:
    """Bytes to an upright RGB image, or ImageError saying why not.

    `draft_side` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the image will be
    shrunk to that side anyway, which is most of the decode cost of large JPEGs.
    """
    return decode_image_drafted(data, max_pixels, draft_side)[0]


def decode_image_drafted(data: bytes, max_pixels: int, draft_side: int | None = None) -> tuple[Image.Image, bool]:
    """`decode_image`, also saying whether libjpeg decoded at a reduced scale."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings(), _pillow_pixel_limit(max_pixels):
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})")
            # Animations (GIF, APNG, WebP) and multi-page files (TIFF, MPO): Image.open is
            # positioned on the first frame, which is what gets used. (Not asking for
            # n_frames spares scanning every frame of a long animation.)
            if draft_side and image.format == "JPEG" and image.mode in ("RGB", "L", "YCbCr"):
                image.draft("RGB", fitted_size(width, height, draft_side, 1))
            image.load()
            if image.size[0] * image.size[1] > max_pixels:  # a container whose frame was larger than its header said
                raise ImageError(f"image too large: {image.size[0]}x{image.size[1]} pixels exceeds the limit of {max_pixels}")
            drafted = image.size != (width, height)
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image), drafted
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "a frame"
        raise ImageError(f"image too large: {size} (a frame inside the file) exceeds the limit of {max_pixels}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise ImageError(f"corrupt or truncated image data: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - crafted files make Pillow raise anything (struct.error, KeyError...)
        raise ImageError(f"corrupt image data ({type(exc).__name__}: {exc})") from None


def _resize_uint8_torch(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize of an RGB image with torch's uint8 kernels, as HWC."""
    import torch

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]  # a writable copy
    resized = torch.nn.functional.interpolate(pixels, size=(size[1], size[0]), mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


def resize_and_pad(image: Image.Image, view: ImageView, approximate: bool = False) -> np.ndarray:
    """Resize (longest side) and pad to a centred square, as uint8 HWC.

    `approximate` allows torch's faster bicubic for an image that is already approximate
    (draft-decoded); otherwise Pillow's, the processor's own, bit for bit.
    """
    width, height = image.size
    new_w, new_h = fitted_size(width, height, view.size, view.min_size)
    if (new_w, new_h) == (width, height):
        array = np.asarray(image, dtype=np.uint8)
    elif approximate and view.resample == Image.BICUBIC and image.mode == "RGB":
        array = _resize_uint8_torch(image, (new_w, new_h))
    else:
        array = np.asarray(image.resize((new_w, new_h), resample=view.resample), dtype=np.uint8)
    side = max(new_w, new_h)
    if new_w == new_h:
        return array
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = np.asarray(view.background, dtype=np.uint8)
    if new_w > new_h:
        top = (side - new_h) // 2
        canvas[top : top + new_h] = array
    else:
        left = (side - new_w) // 2
        canvas[:, left : left + new_w] = array
    return canvas


def render_views(image: Image.Image, views: list[ImageView], approximate: bool = False) -> dict[str, np.ndarray]:
    """All views of one image as uint8 CHW arrays, honouring each view's source.

    `approximate`: the image was draft-decoded, so a faster resize is fine (see module doc).
    """
    rendered_hwc: dict[str, np.ndarray] = {}
    for view in views:
        base = image if view.source is None else Image.fromarray(rendered_hwc[view.source])
        rendered_hwc[view.name] = resize_and_pad(base, view, approximate)
    return {name: np.ascontiguousarray(array.transpose(2, 0, 1)) for name, array in rendered_hwc.items()}


def view_constants(view: ImageView, device):
    """(mean, std) as [1, 3, 1, 1] float32 tensors on `device`: make them once per device,
    since creating a device tensor from a Python list waits for the device to go idle."""
    import torch

    mean = torch.tensor(view.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(view.std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    return mean, std


def normalize_pixels(pixels, view: ImageView, dtype, constants=None):
    """uint8 NCHW tensor to the processor's normalised floats, in float32 then `dtype`.

    Same arithmetic as the processor (rescale in float64, then (x - mean) / std in
    float32), so the device result equals the CPU processor's bit for bit.
    """
    import torch

    x = (pixels.to(torch.float64) * view.rescale_factor).to(torch.float32)
    mean, std = constants if constants is not None else view_constants(view, x.device)
    return ((x - mean) / std).to(dtype)
