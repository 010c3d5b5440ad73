"""`--jpeg-reducing-gap`: large JPEGs decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
scaling, PIL's `draft`) where that still leaves the model's first resize a reduction of
at least the gap; the answer keeps the upload's geometry, and the pixels stay close to
the exact transform's (torchvision's on the full decode)."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from pydantic import ValidationError
from torchvision import transforms

from hornet_bundle import Preprocess, load_bundle
from service import imaging
from service.pipelines import pipeline_for
from service.settings import DEMO_BUNDLES_DIR, Settings
from service.testing import running_server
from tests.helpers.images import encode, phone_photo, photo_36mpx
from tests.helpers.memory import memory_of

MIB = 1 << 20
CLASSIFY_224 = Preprocess(
    resize_mode="shorter_side_center_crop",
    input_size=(224, 224),
    crop_pct=0.875,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


def _draft(preprocess: Preprocess, gap: float) -> imaging.DraftSize:
    return imaging.draft_size(lambda w, h: imaging.first_resize(preprocess, w, h), gap)


@pytest.fixture(scope="module")
def phone_jpeg(photos) -> bytes:
    return phone_photo(photos["astronaut"])


@pytest.mark.parametrize("name", ["astronaut", "coffee", "portrait"])
def test_first_resize_is_the_size_torchvision_resizes_to(photos, name: str) -> None:
    image = Image.fromarray(photos[name])
    resized = transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC)(image)
    assert imaging.first_resize(CLASSIFY_224, *image.size) == resized.size
    direct = CLASSIFY_224.model_copy(update={"resize_mode": "direct", "input_size": (384, 512)})
    assert imaging.first_resize(direct, *image.size) == (512, 384)
    fit = CLASSIFY_224.model_copy(update={"resize_mode": "fit", "scale": (1333, 800)})
    fitted = imaging.fit_image(image, (1333, 800), "opencv")
    assert imaging.first_resize(fit, *image.size) == (fitted.shape[1], fitted.shape[0])
    assert imaging.first_resize(fit.model_copy(update={"scale": None}), *image.size) is None


@pytest.mark.parametrize(("gap", "scale"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_a_jpeg_decodes_at_the_largest_scale_the_gap_allows(phone_jpeg, gap, scale) -> None:
    # the resize needs 341x256 of a 4032x3024 photo; libjpeg reduces by 1/2, 1/4 or 1/8,
    # rounding up: the largest factor s with 4032 // (341 gap) >= s and 3024 // (256 gap) >= s
    decoded = imaging.decode_image(phone_jpeg, 10**8, draft=_draft(CLASSIFY_224, gap))
    assert decoded.size == (4032, 3024)
    assert decoded.image.size == (math.ceil(4032 / scale), math.ceil(3024 / scale))
    assert decoded.image.mode == "RGB"
    assert decoded.reduction == scale and decoded.reduced == (scale > 1)
    assert min(decoded.image.width / 341, decoded.image.height / 256) >= min(gap, 4032 / 341)


@pytest.mark.parametrize("kind", ["progressive", "cmyk"])
def test_progressive_and_cmyk_jpegs_reduce_too(photos, kind: str) -> None:
    large = Image.fromarray(photos["coffee"]).resize((2400, 1600), Image.Resampling.LANCZOS)
    if kind == "cmyk":
        data = encode(large.convert("CMYK"), "JPEG", quality=90)
    else:
        data = encode(large, "JPEG", quality=90, progressive=True)
    decoded = imaging.decode_image(data, 10**8, draft=_draft(CLASSIFY_224, 2))
    assert decoded.size == (2400, 1600) and decoded.image.size == (1200, 800)
    assert decoded.image.mode == "RGB"
    exact = imaging.decode_image(data, 10**8).image
    crop = imaging.classification_input(decoded.image, CLASSIFY_224, decoded.size)
    reference = imaging.classification_input(exact, CLASSIFY_224)
    assert np.abs(crop.astype(np.int16) - reference).mean() < 0.5


def test_without_a_draft_or_room_to_reduce_the_decode_is_exact(photos, phone_jpeg) -> None:
    exact = imaging.decode_image(phone_jpeg, 10**8)
    assert exact.image.size == exact.size == (4032, 3024) and not exact.reduced
    small = encode(photos["chelsea"], "JPEG", quality=95)  # 451x300: no room at gap 2
    for data in (small, encode(photos["chelsea"], "PNG")):
        draft = imaging.decode_image(data, 10**8, draft=_draft(CLASSIFY_224, 2))
        np.testing.assert_array_equal(
            np.asarray(draft.image), np.asarray(imaging.decode_image(data, 10**8).image)
        )
        assert draft.size == (451, 300) and not draft.reduced


def test_reduced_crops_stay_close_to_torchvision_on_the_full_decode(photos, phone_jpeg) -> None:
    official = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.PILToTensor(),
        ]
    )
    full = imaging.decode_image(phone_jpeg, 10**8).image
    expected = official(full).permute(1, 2, 0).numpy().astype(np.int16)
    np.testing.assert_array_equal(imaging.classification_input(full, CLASSIFY_224), expected)
    errors = {}
    for gap in (1, 2, 4):
        decoded = imaging.decode_image(phone_jpeg, 10**8, draft=_draft(CLASSIFY_224, gap))
        crop = imaging.classification_input(decoded.image, CLASSIFY_224, decoded.size)
        assert crop.shape == (224, 224, 3)
        difference = np.abs(crop.astype(np.int16) - expected)
        errors[gap] = (difference.mean(), np.percentile(difference, 99.9))
    print({gap: (round(m, 3), p) for gap, (m, p) in errors.items()})
    # measured: 1/8 scale 0.69 grey levels on average, 1/4 0.24, 1/2 0.12
    assert errors[1][0] > errors[2][0] > errors[4][0]
    assert errors[2][0] < 0.5 and errors[2][1] <= 4
    assert errors[4][0] < 0.25 and errors[4][1] <= 2


def test_a_quarter_turned_photo_keeps_its_upright_size(photos) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 4032x3024, shown 3024x4032
    data = phone_photo(photos["coffee"], exif=exif)
    wide = CLASSIFY_224.model_copy(update={"resize_mode": "direct", "input_size": (250, 1000)})
    decoded = imaging.decode_image(data, 10**8, draft=_draft(wide, 1))
    assert decoded.size == (3024, 4032)
    # upright the model needs 1000 wide: 3024 // 1000 = 3, so only 1/2 (read sideways it
    # would have taken 1/4: 756 wide)
    assert decoded.image.size == (1512, 2016)
    exact = imaging.decode_image(data, 10**8).image
    assert exact.size == (3024, 4032)
    crop = imaging.classification_input(decoded.image, wide, decoded.size)
    reference = imaging.classification_input(exact, wide)
    assert crop.shape == reference.shape == (250, 1000, 3)
    assert np.abs(crop.astype(np.int16) - reference).mean() < 0.5


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_dense_pipelines_keep_the_uploads_geometry(photos, task: str) -> None:
    pipeline = pipeline_for(load_bundle(DEMO_BUNDLES_DIR / f"shapes_{task}").manifest)
    data = phone_photo(photos["rocket"], 3000, 2000)
    exact = pipeline.prepare(imaging.decode_image(data, 10**8))
    decoded = imaging.decode_image(data, 10**8, draft=imaging.draft_size(pipeline.first_resize, 2))
    assert decoded.reduced and decoded.size == (3000, 2000)
    reduced = pipeline.prepare(decoded)
    assert (reduced.width, reduced.height) == (exact.width, exact.height) == (3000, 2000)
    assert len(reduced.items) == len(exact.items)
    for ours, theirs in zip(reduced.items, exact.items, strict=True):
        assert ours.shape == theirs.shape
        # cv2's bilinear resize does not filter: from the reduced decode it aliases less
        assert np.abs(ours.astype(np.int16) - theirs).mean() < 3.0
    if task == "detect":
        assert reduced.context.fitted == exact.context.fitted
    else:
        assert reduced.context.boxes == exact.context.boxes


def test_a_gap_under_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="reducing gap under 1"):
        Settings(jpeg_reducing_gap=0.5)
    assert Settings(jpeg_reducing_gap=1.5).jpeg_reducing_gap == 1.5


def test_a_server_decodes_phone_photos_reduced_in_bounded_memory(tmp_path) -> None:
    """Four 36-megapixel JPEGs at once to the demo classifier (96 px): decoded in full each
    takes 103 MiB; with --jpeg-reducing-gap 2 each decodes at 1/8 scale (750x750), and the
    answer is the exact transform's answer, computed here with ONNX Runtime."""
    bundle = DEMO_BUNDLES_DIR / "shapes_classify"
    photo = photo_36mpx()
    pipeline = pipeline_for(load_bundle(bundle).manifest)
    exact = pipeline.prepare(imaging.decode_image(photo, 10**8))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, pipeline._batch_input(exact.items))
    expected = np.exp(logits[0] - logits[0].max())
    expected /= expected.sum()
    flags = ["--model-dir", str(bundle), "--jpeg-reducing-gap", "2", "--decode-threads", "4"]
    server = running_server(flags, log_path=tmp_path / "server.log", memory_limit_bytes=8 << 30)
    with server as (url, process, _):
        small = encode(np.full((64, 64, 3), 128, dtype=np.uint8), "JPEG")
        headers = {"Content-Type": "image/jpeg"}
        warm = httpx.post(f"{url}/classify", content=small, headers=headers, timeout=60)
        assert warm.status_code == 200, warm.text[:300]
        time.sleep(0.5)
        idle = memory_of(process.pid)["VmHWM"]

        def classify(_: int) -> dict:
            response = httpx.post(
                f"{url}/classify",
                params={"top_k": 3},
                content=photo,
                headers=headers,
                timeout=120,
            )
            assert response.status_code == 200, response.text[:300]
            return response.json()["results"][0]

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(classify, range(4)))
        peak = memory_of(process.pid)["VmHWM"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    print(f"peak over idle with four 36 Mpx photos: {(peak - idle) / MIB:.0f} MiB")
    # one full decode alone is 6000 x 6000 x 3 bytes (103 MiB), four are 412 MiB
    assert peak - idle < 60 * MIB
    labels = pipeline.manifest.labels
    for answer in answers:
        best = answer["top_k"][0]
        assert best["label"] == labels[int(expected.argmax())]
        assert abs(best["score"] - float(expected.max())) < 0.02
    series = 'hornet_decoded_images_total{model="shapes_classify",reduction="%s"}'
    # the warm-up image in full, the four photos at 1/8
    assert f"{series % 1} 1.0" in metrics and f"{series % 8} 4.0" in metrics
    assert f"{series % 2} 0.0" in metrics and f"{series % 4} 0.0" in metrics
    assert 'hornet_decode_seconds_count{model="shapes_classify"} 5.0' in metrics
