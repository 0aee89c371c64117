"""images.decode_image on hostile files: each is decoded upright to RGB or refused with ImageError."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dvl_batch.preprocess.images import ImageError, decode_image, render_views, views_from_image_processor

from .hostile_files import BLUE, GREEN, RED, animated_gif, hostile_images, multipage_tiff, png_header_only

LIMIT = 1_000_000
CASES = hostile_images(LIMIT)


def near(pixel, color, tolerance: int = 40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, color, strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_image_is_decoded_or_refused(case):
    if case.error:
        with pytest.raises(ImageError, match=case.error):
            decode_image(case.data, LIMIT)
        return
    image = decode_image(case.data, LIMIT)
    assert image.mode == "RGB" and image.size == case.size


@pytest.mark.parametrize("case", [c for c in CASES if c.size], ids=[c.name for c in CASES if c.size])
def test_every_decodable_hostile_image_renders_model_views(case, tiny_processor):
    """Odd sizes (1x1, 1x5000) still give full square views for the vision tower."""
    views = views_from_image_processor(tiny_processor.image_processor)
    rendered = render_views(decode_image(case.data, LIMIT, draft_side=views[0].size), views)
    for view in views:
        assert rendered[view.name].shape == (3, view.size, view.size) and rendered[view.name].dtype == np.uint8


def test_animation_and_multipage_files_use_the_first_frame():
    for data in (animated_gif(), multipage_tiff()):
        image = decode_image(data, LIMIT)
        assert near(image.getpixel((5, 5)), RED), image.getpixel((5, 5))
        assert not near(image.getpixel((5, 5)), GREEN) and not near(image.getpixel((5, 5)), BLUE)


def test_exif_orientation_is_applied():
    image = decode_image(next(c for c in CASES if c.name == "rotated.jpg").data, LIMIT)
    assert image.size == (20, 40)
    assert near(image.getpixel((10, 5)), RED) and near(image.getpixel((10, 35)), BLUE)


def test_transparency_is_composited_over_white_and_16_bit_is_scaled():
    palette = decode_image(next(c for c in CASES if c.name == "palette.png").data, LIMIT)
    assert palette.getpixel((2, 5)) == (255, 255, 255) and near(palette.getpixel((15, 5)), RED)
    deep = decode_image(next(c for c in CASES if c.name == "deep.png").data, LIMIT)
    assert deep.getpixel((0, 0)) == (0, 0, 0) and deep.getpixel((63, 0)) == (255, 255, 255)
    assert 100 < deep.getpixel((32, 0))[0] < 160


def test_cmyk_jpeg_becomes_rgb():
    image = decode_image(next(c for c in CASES if c.name == "cmyk.jpg").data, LIMIT)
    assert image.getpixel((5, 5))[0] > 200 and image.getpixel((5, 5))[1] < 60


def test_pixel_limit_is_checked_before_any_pixel_is_decoded():
    started = time.perf_counter()
    with pytest.raises(ImageError, match="100000x100000 pixels exceeds the limit"):
        decode_image(png_header_only(100_000, 100_000), 89_478_485)  # 30 GB of RGB if it were decoded
    assert time.perf_counter() - started < 1.0
    assert decode_image(next(c for c in CASES if c.name == "dot.png").data, 1).size == (1, 1)  # limit is inclusive
    with pytest.raises(ImageError, match="exceeds the limit of 4"):
        decode_image(next(c for c in CASES if c.name == "wide.png").data, 4)


def _jpeg(image, quality: int = 92) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_large_jpegs_are_draft_decoded_and_resized_fast_small_ones_exactly(tiny_processor):
    """Fast decoding trades exactness only where the draft decode already did: big JPEGs."""
    from PIL import Image

    from dvl_batch.preprocess.images import decode_image_drafted

    from .conftest import IMAGES

    view = views_from_image_processor(tiny_processor.image_processor)[0]
    photo = Image.open(IMAGES / "rocket.jpg").convert("RGB")
    big = _jpeg(photo.resize((photo.width * 2, photo.height * 2), Image.BICUBIC))  # 1280 px: halved by libjpeg
    image, drafted = decode_image_drafted(big, 100 * LIMIT, draft_side=view.size)
    assert drafted and image.size == (photo.width, photo.height)
    fast = render_views(image, [view], approximate=True)[view.name].astype(int)
    pillow = render_views(image, [view])[view.name].astype(int)
    assert fast.shape == pillow.shape == (3, view.size, view.size)
    assert np.abs(fast - pillow).max() <= 3 and np.abs(fast - pillow).mean() < 1.0

    small = (IMAGES / "rocket.jpg").read_bytes()  # 640 px: under twice the view's side, decoded in full
    image, drafted = decode_image_drafted(small, LIMIT, draft_side=view.size)
    assert not drafted
    processor_pixels = tiny_processor.image_processor(image, return_tensors="np")["pixel_values"][0]
    ours = render_views(image, [view])[view.name]
    restored = ours.astype(np.float64) * view.rescale_factor
    expected = (restored.astype(np.float32) - np.float32(view.mean[0])) / np.float32(view.std[0])
    assert np.array_equal(expected.astype(np.float32), processor_pixels.astype(np.float32))


@pytest.mark.skipif(not __import__("PIL.features").features.check("webp"), reason="this Pillow has no WebP")
def test_webp_still_and_animated_decode():
    """Pillow's WebP plugin calls the pixel-limit check with `error_only=True`: a stand-in with
    another signature made every WebP an error row ("not an image")."""
    import io

    from PIL import Image

    still = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(still, format="WEBP", lossless=True)
    frames = [Image.new("RGB", (64, 48), color) for color in (RED, GREEN)]
    animated = io.BytesIO()
    frames[0].save(animated, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    for data in (still.getvalue(), animated.getvalue()):
        image = decode_image(data, LIMIT)
        assert image.size == (64, 48) and near(image.getpixel((5, 5)), RED)
    with pytest.raises(ImageError, match="image too large"):
        decode_image(still.getvalue(), 1000)
