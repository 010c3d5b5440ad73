"""Decoding and preprocessing reproduce the official evaluation transforms exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from hornet_bundle import Preprocess, SlidingWindow
from service import imaging
from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from tests.helpers.images import encode

PHOTO_NAMES = ["astronaut", "coffee", "chelsea", "rocket", "portrait"]


def _preprocess(size: int, **overrides) -> Preprocess:
    values = dict(
        resize_mode="shorter_side_center_crop" if size < 384 else "direct",
        input_size=(size, size),
        crop_pct=0.875 if size < 384 else 1.0,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    values.update(overrides)
    return Preprocess(**values)


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_classification_crop_is_bit_identical_to_torchvision(photos, name: str) -> None:
    image = Image.fromarray(photos[name])
    official = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.PILToTensor(),
        ]
    )
    expected = official(image).permute(1, 2, 0).numpy()
    ours = imaging.classification_input(image, _preprocess(224))
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("name", ["chelsea", "portrait"])
def test_direct_resize_is_bit_identical_to_torchvision(photos, name: str) -> None:
    image = Image.fromarray(photos[name])
    official = transforms.Compose(
        [
            transforms.Resize((384, 384), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.PILToTensor(),
        ]
    )
    expected = official(image).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(imaging.classification_input(image, _preprocess(384)), expected)


def test_host_normalisation_matches_the_formula() -> None:
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    ours = imaging.normalize_nchw(batch, _preprocess(224))
    expected = (batch / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(ours, expected.transpose(0, 3, 1, 2), atol=1e-5)


def test_decoding_applies_exif_orientation(photos) -> None:
    array = photos["chelsea"]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(array, "JPEG", exif=exif, quality=95)
    decoded = imaging.decode_image(data, max_pixels=10**8).image
    assert decoded.size == (array.shape[0], array.shape[1])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1"])
def test_other_modes_convert_as_pil_does(photos, mode: str) -> None:
    source = Image.fromarray(photos["coffee"]).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    decoded = imaging.decode_image(encode(source, fmt), max_pixels=10**8).image
    expected = Image.open(io.BytesIO(encode(source, fmt))).convert("RGB")
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    decoded = imaging.decode_image(encode(Image.fromarray(values)), max_pixels=100).image
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(decoded)[..., 0], expected)
    np.testing.assert_array_equal(np.asarray(decoded)[..., 2], expected)


@pytest.mark.parametrize("piece_pixels", [7, 40, 1 << 18])
@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_greyscale_is_scaled_piece_by_piece_as_whole(monkeypatch, mode, piece_pixels) -> None:
    """16-bit and float greyscale are scaled a piece at a time (bounded temporaries):
    pieces narrower than a row (7), of several rows (40), or the whole image give the
    formula's values on the whole image, at every pixel."""
    monkeypatch.setattr(imaging, "_GREY_PIECE_PIXELS", piece_pixels)
    rng = np.random.default_rng(3)
    if mode == "F":
        values = rng.uniform(-20, 280, (23, 37)).astype(np.float32)
        values[0, :3] = [np.nan, np.inf, -np.inf]
        expected = np.rint(np.clip(np.nan_to_num(values), 0, 255)).astype(np.uint8)
        data = encode(Image.fromarray(values), "TIFF")
    else:
        dtype = np.uint16 if mode == "I;16" else np.int32
        low, high = (0, 65536) if mode == "I;16" else (-5000, 90000)
        values = rng.integers(low, high, (23, 37)).astype(dtype)
        expected = np.rint(np.clip(values.astype(np.int64), 0, 65535) / 257.0).astype(np.uint8)
        data = encode(Image.fromarray(values), "PNG" if mode == "I;16" else "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    decoded = np.asarray(imaging.decode_image(data, max_pixels=10**4).image)
    np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_supported_formats_decode(photos, fmt: str) -> None:
    decoded = imaging.decode_image(encode(photos["chelsea"], fmt), max_pixels=10**8).image
    assert decoded.size == (451, 300) and decoded.mode == "RGB"


def test_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = imaging.decode_image(buffer.getvalue(), max_pixels=100).image
    assert tuple(np.asarray(decoded)[0, 0]) == (255, 0, 0)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (6_000, 6_000)))
    assert len(bomb) < 200_000
    with pytest.raises(PayloadTooLarge, match="6000x6000 = 36000000 pixels"):
        imaging.decode_image(bomb, max_pixels=1_000_000)


def test_truncated_image_is_a_bad_image(photos) -> None:
    data = encode(photos["chelsea"], "JPEG")
    with pytest.raises(BadImage, match="truncated"):
        imaging.decode_image(data[: len(data) // 2], max_pixels=10**8)


def test_non_image_bytes_are_unsupported() -> None:
    with pytest.raises(UnsupportedMediaType):
        imaging.decode_image(b"%PDF-1.4 definitely not an image", max_pixels=100)


def test_bilinear_resize_matches_torch_interpolate() -> None:
    values = np.random.default_rng(1).normal(size=(3, 37, 53)).astype(np.float32)
    for height, width in ((80, 120), (20, 31), (37, 53)):
        expected = F.interpolate(
            torch.from_numpy(values)[None],
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0].numpy()
        np.testing.assert_allclose(
            imaging.resize_bilinear(values, height, width), expected, atol=1e-5
        )


def _torch_resized_argmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """mmseg's way: the logits resized by torch (bilinear, align_corners False), argmax."""
    resized = F.interpolate(
        torch.from_numpy(logits)[None], size=size, mode="bilinear", align_corners=False
    )
    return resized[0].argmax(0).numpy()


def test_resized_argmax_equals_argmax_of_the_resized_logits() -> None:
    logits = np.random.default_rng(2).normal(size=(5, 17, 23)).astype(np.float32)
    expected = _torch_resized_argmax(logits, (70, 41))
    np.testing.assert_array_equal(imaging.resized_argmax(logits, 70, 41), expected)


def _class_regions(channels: int, height: int, width: int, seed: int) -> np.ndarray:
    """Logits as a segmenter gives them: each class high over regions, smooth between."""
    coarse = np.random.default_rng(seed).normal(size=(1, channels, 4, 5)).astype(np.float32)
    fine = F.interpolate(
        torch.from_numpy(coarse * 4), size=(height, width), mode="bilinear", align_corners=False
    )
    return fine[0].numpy()


@pytest.mark.parametrize(
    ("channels", "source", "size"),
    [
        (6, (40, 52), (301, 413)),  # up, most pixels inside one class's region
        (6, (80, 100), (37, 45)),  # down
        (300, (20, 24), (90, 70)),  # past 256 classes: uint16
        (150, (64, 86), (1000, 700)),  # ADE20K's classes, bands and chunks
    ],
)
def test_resized_argmax_on_class_regions_equals_torch(channels, source, size) -> None:
    """Where the four source pixels agree the class is taken without blending: the
    result is still exactly torch's resize then argmax, boundaries included."""
    logits = _class_regions(channels, *source, seed=channels)
    expected = _torch_resized_argmax(logits, size)
    got = imaging.resized_argmax(logits, *size)
    assert got.dtype == (np.uint8 if channels <= 256 else np.uint16)
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("channels", "size"), [(150, (300, 200)), (3, (333, 1000))])
def test_resized_argmax_on_noise_equals_torch(channels, size) -> None:
    """Logits of noise put nearly every output pixel on a boundary: its bands are
    blended whole, and the result is still torch's."""
    logits = np.random.default_rng(channels).normal(size=(channels, 64, 86)).astype(np.float32)
    expected = _torch_resized_argmax(logits, size)
    np.testing.assert_array_equal(imaging.resized_argmax(logits, *size), expected)


def test_resized_argmax_memory_is_bounded_by_the_logits_not_the_output() -> None:
    """ADE20K's 150 classes at a phone photo's size: resizing every class first takes
    150 x 64 x 4000 floats before the rows (440 MiB); the mask itself is 11.4 MiB."""
    import tracemalloc

    logits = _class_regions(150, 64, 86, seed=4)
    tracemalloc.start()
    try:
        mask = imaging.resized_argmax(logits, 3000, 4000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.shape == (3000, 4000)
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_fit_size_follows_mmcv_rescale() -> None:
    assert imaging.fit_size(300, 451, (2048, 512)) == (512, 770)
    assert imaging.fit_size(100, 1000, (2048, 512)) == (205, 2048)


def test_sliding_windows_cover_the_image_and_stay_inside() -> None:
    window = SlidingWindow(crop=(512, 512), stride=(341, 341))
    boxes = list(imaging.window_boxes(512, 770, window))
    assert boxes == [(0, 512, 0, 512), (0, 512, 258, 770)]
    coverage = np.zeros((512, 770), dtype=int)
    for y1, y2, x1, x2 in boxes:
        coverage[y1:y2, x1:x2] += 1
    assert coverage.min() >= 1
