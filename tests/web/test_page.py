"""The try-it page in headless Chromium against the demo models: what it draws.

Scenes come from the demo generator (model_export.demo.shapes), so the test knows each
shape's label, mask and box and checks the drawing: the top-1 label in the page, the
overlay's colour inside each shape, a box in the detection's colour around each shape.
With HORNET_PAGE_SCREENSHOTS=DIR the three views are also saved there as PNGs (the
README's pictures: HORNET_PAGE_SCREENSHOTS=docs/img).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model_export.demo.shapes import CLASS_NAMES, generate_sample_scene, generate_scene
from tests.web.serving import DEMO_BUNDLES, open_browser, running_service

pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e .[dev]")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# Seeds of generate_scene / generate_sample_scene whose shapes the demo models get right
# (checked once; the models and the generator are deterministic).
SCENE_SEED = 20  # 320x240: two circles, a square and a triangle
SAMPLE_SEED = 2  # one triangle
SCREENSHOTS = os.environ.get("HORNET_PAGE_SCREENSHOTS")
KEY = "hornet-page-test-key-7c1d9e04"


def write_png(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory):
    """A scene of known shapes and the PNG the page uploads."""
    found = generate_scene(np.random.default_rng(SCENE_SEED), 240, 320)
    path = write_png(found.image, tmp_path_factory.mktemp("scene") / "scene.png")
    return found, path


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    found = generate_sample_scene(np.random.default_rng(SAMPLE_SEED), 240, 320)
    path = write_png(found.image, tmp_path_factory.mktemp("sample") / "sample.png")
    return CLASS_NAMES[int(found.labels[0])], path


def most_interior(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a pixel deepest inside `mask`: the last to go under repeated erosion."""
    deepest = mask
    while mask.any():
        deepest = mask
        mask = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0)
        mask = mask & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    ys, xs = np.nonzero(deepest)
    return int(xs[len(xs) // 2]), int(ys[len(ys) // 2])


def iou(a, b) -> float:
    dx = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    dy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = dx * dy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def state(driver) -> str:
    return driver.find_element(By.ID, "result").get_attribute("data-state")


def open_page(driver, base_url: str) -> None:
    driver.get(base_url + "/")
    WebDriverWait(driver, 30).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#model option")
            or d.find_element(By.ID, "error").is_displayed()
        )
    )


def ask(driver, model: str, image: Path) -> None:
    """Choose `model`, upload `image` through the file input, wait for the answer."""
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    driver.execute_script("document.getElementById('result').dataset.state = 'sent'")
    driver.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(driver, 60).until(lambda d: state(d) in ("done", "error"))


def pixel(driver, canvas: str, x: int, y: int) -> list[int]:
    """RGBA of one pixel of a canvas on the page."""
    return driver.execute_script(
        "const c = document.getElementById(arguments[0]).getContext('2d');"
        "return Array.from(c.getImageData(arguments[1], arguments[2], 1, 1).data);",
        canvas, x, y,
    )  # fmt: skip


def share_in_colour(driver, points: list[tuple[int, int]], colour: list[int]) -> float:
    """The fraction of `points` on the box canvas that are opaque `colour`."""
    return driver.execute_script(
        "const [points, [r, g, b]] = arguments;"
        "const c = document.getElementById('boxes').getContext('2d');"
        "const data = c.getImageData(0, 0, c.canvas.width, c.canvas.height).data;"
        "const at = ([x, y]) => 4 * (y * c.canvas.width + x);"
        "const hits = points.filter((p) => { const i = at(p);"
        "  return data[i] === r && data[i + 1] === g && data[i + 2] === b && data[i + 3] === 255;"
        "});"
        "return hits.length / points.length;",
        points, colour,
    )  # fmt: skip


def screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.execute_script("document.activeElement.blur()")
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))


def test_startup_log_links_the_page(demo_server, demo_log) -> None:
    lines = [json.loads(line) for line in demo_log.read_text().splitlines()]
    links = [line["url"] for line in lines if "in a browser" in line["message"]]
    assert links == [f"{demo_server}/"]


def test_page_is_served_with_its_script_and_style(browser, demo_server) -> None:
    open_page(browser, demo_server)
    assert browser.title == "HorNet Serve"
    names = [
        o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")
    ]
    assert names == ["shapes_classify", "shapes_detect", "shapes_segment"]
    assert browser.execute_script("return typeof HornetPage.decodeRle") == "function"
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_classification_shows_the_top_label_first_with_bars_latency_and_engine(
    browser, demo_server, sample
) -> None:
    label, path = sample
    open_page(browser, demo_server)
    ask(browser, "shapes_classify", path)
    assert state(browser) == "done"
    rows = browser.find_elements(By.CSS_SELECTOR, "#answer .topk li")
    assert len(rows) == 3
    assert rows[0].find_element(By.CSS_SELECTOR, ".label").text == label
    widths = [r.find_element(By.CSS_SELECTOR, ".fill").size["width"] for r in rows]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    engine = httpx.get(f"{demo_server}/v1/models").json()["models"][0]["engine"]
    timing = browser.find_element(By.ID, "timing").text
    assert " ms round trip" in timing and engine in timing
    # the server's own account (its Server-Timing header), within the round trip
    said = re.search(
        r"(\d+) ms round trip \(in the server: decoding (\d+\.\d), queue (\d+\.\d), "
        r"engine (\d+\.\d), answer (\d+\.\d) ms\)",
        timing,
    )
    assert said, timing
    round_trip, *stages = (float(figure) for figure in said.groups())
    assert float(said[4]) > 0 and sum(stages) <= round_trip + 0.5
    screenshot(browser, "page-classify.png")


def test_segmentation_overlay_paints_each_shape_in_its_class_colour(
    browser, demo_server, scene
) -> None:
    found, path = scene
    open_page(browser, demo_server)
    ask(browser, "shapes_segment", path)
    assert state(browser) == "done"
    legend = {
        item.get_attribute("data-label"): item.get_attribute("data-colour")
        for item in browser.find_elements(By.CSS_SELECTOR, "#answer .legend li")
    }
    assert set(legend) == {"background", "circle", "square", "triangle"}
    for label, mask in zip(found.labels, found.masks, strict=True):
        name = CLASS_NAMES[int(label)]
        colour = [int(v) for v in legend[name].split(",")]
        assert pixel(browser, "overlay", *most_interior(mask)) == [*colour, 255], name
    background = most_interior(found.class_mask == 0)
    assert pixel(browser, "overlay", *background)[3] == 0
    screenshot(browser, "page-segment.png")


def test_detection_draws_a_box_in_its_colour_around_each_shape_and_its_mask(
    browser, demo_server, scene
) -> None:
    found, path = scene
    open_page(browser, demo_server)
    ask(browser, "shapes_detect", path)
    assert state(browser) == "done"
    rows = browser.find_elements(By.CSS_SELECTOR, "#answer table.detections tbody tr")
    drawn = [
        (
            row.get_attribute("data-label"),
            [float(v) for v in row.get_attribute("data-box").split(",")],
            [int(v) for v in row.get_attribute("data-colour").split(",")],
        )
        for row in rows
    ]
    scale = int(browser.find_element(By.ID, "boxes").get_attribute("data-scale"))
    for label, box, mask in zip(found.labels, found.boxes, found.masks, strict=True):
        name = CLASS_NAMES[int(label)]
        match = [d for d in drawn if d[0] == name and iou(d[1], box) > 0.8]
        assert match, f"no {name} box drawn near {box.tolist()}: {drawn}"
        _, (x1, y1, x2, y2), colour = match[0]
        left, top, right, bottom = (round(v * scale) for v in (x1, y1, x2, y2))
        sides = {
            "top": [(x, top) for x in range(left, right)],
            "bottom": [(x, bottom - 1) for x in range(left, right)],
            "left": [(left, y) for y in range(top, bottom)],
            "right": [(right - 1, y) for y in range(top, bottom)],
        }
        for side, points in sides.items():  # another box's label may cross a side
            assert share_in_colour(browser, points, colour) > 0.75, (name, side)
        assert pixel(browser, "overlay", *most_interior(mask)) == [*colour, 255], name
    screenshot(browser, "page-detect.png")


def test_threshold_slider_moved_by_keyboard_hides_and_shows_detections(
    browser, demo_server, scene
) -> None:
    found, path = scene
    open_page(browser, demo_server)
    ask(browser, "shapes_detect", path)
    slider = browser.find_element(By.ID, "threshold")
    slider.send_keys(Keys.END)
    assert browser.find_elements(By.CSS_SELECTOR, "table.detections tbody tr") == []
    assert browser.execute_script(
        "const c = document.getElementById('boxes');"
        "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".every((v, i) => i % 4 !== 3 || v === 0);"
    )
    slider.send_keys(Keys.HOME)
    shown = browser.find_elements(By.CSS_SELECTOR, "table.detections tbody tr")
    assert len(shown) >= len(found.labels)


def test_generated_sample_scene_is_uploaded_and_answered(browser, demo_server) -> None:
    open_page(browser, demo_server)
    Select(browser.find_element(By.ID, "model")).select_by_value("shapes_classify")
    browser.find_element(By.ID, "sample").click()
    WebDriverWait(browser, 60).until(lambda d: state(d) in ("done", "error"))
    assert state(browser) == "done"
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#answer .topk .label")]
    assert sorted(labels) == sorted(CLASS_NAMES)
    assert browser.find_element(By.ID, "photo").get_attribute("src").startswith("blob:")


def test_an_api_error_is_shown_as_the_api_message(browser, demo_server, tmp_path) -> None:
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    body = httpx.post(
        f"{demo_server}/classify", files={"file": ("notes.txt", b"not an image", "text/plain")}
    ).json()
    open_page(browser, demo_server)
    ask(browser, "shapes_classify", not_an_image)
    assert state(browser) == "error"
    assert browser.find_element(By.ID, "error").text == f"{body['error']}: {body['detail']}"


def test_rle_decoder_matches_pycocotools(browser, demo_server) -> None:
    """Small and large masks: multi-character counts and negative deltas."""
    rng = np.random.default_rng(0)
    small = rng.random((37, 53)) > 0.6
    large = np.zeros((600, 800), dtype=bool)
    large[100:500, 150:700] = True
    large[250:260, :] = False
    open_page(browser, demo_server)
    for mask in (small, large):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        decoded = browser.execute_script(
            "return Array.from(HornetPage.decodeRle(arguments[0])).join('');",
            {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
        )
        assert decoded == "".join("1" if v else "0" for v in mask.ravel())


def test_page_fits_a_phone_width_screen(chromium, demo_server, sample) -> None:
    label, path = sample
    with open_browser(chromium) as phone:
        phone.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
        )
        open_page(phone, demo_server)
        assert phone.execute_script("return window.innerWidth") == 390
        ask(phone, "shapes_classify", path)
        assert phone.find_element(By.CSS_SELECTOR, "#answer .topk .label").text == label
        assert phone.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )


def test_page_asks_for_the_api_key_and_sends_it(chromium, sample, tmp_path) -> None:
    label, path = sample
    flags = ("--model-dir", str(DEMO_BUNDLES / "shapes_classify"), "--api-key", KEY)
    with (
        running_service(tmp_path / "server.log", *flags) as base_url,
        open_browser(chromium) as driver,
    ):
        open_page(driver, base_url)
        error = driver.find_element(By.ID, "error")
        assert error.text.startswith("unauthorized: this route needs an API key")
        assert driver.find_element(By.ID, "key-panel").get_attribute("open") is not None
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        ask(driver, "shapes_classify", path)
        assert driver.find_element(By.CSS_SELECTOR, "#answer .topk .label").text == label
