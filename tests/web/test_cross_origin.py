"""A page of one origin calling the API of another from a real browser (headless
Chromium): with `--cors-origin` naming the page's origin, its script posts an image with
an API key (a preflighted request) and reads the answer and the request id; a server
that does not name it, the browser itself refuses to let the script read."""

from __future__ import annotations

import pytest

from tests.web.serving import DEMO_BUNDLES, open_browser, running_service

pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e .[dev]")

KEY = "hornet-cors-browser-key-41d7"
# Draw a square, post it as a PNG upload with the key, and report what the script saw.
POST_FROM_PAGE = """
const [url, key, done] = arguments;
const canvas = document.createElement("canvas");
canvas.width = canvas.height = 96;
const context = canvas.getContext("2d");
context.fillStyle = "#c83c28";
context.fillRect(20, 20, 50, 50);
canvas.toBlob(async (png) => {
  const form = new FormData();
  form.append("file", png, "square.png");
  try {
    const answer = await fetch(url, {
      method: "POST", body: form, headers: {"Authorization": "Bearer " + key},
    });
    done({status: answer.status, body: await answer.json(),
          requestId: answer.headers.get("X-Request-ID")});
  } catch (error) {
    done({failed: String(error)});
  }
}, "image/png");
"""


def test_a_page_of_an_allowed_origin_reads_the_answer_and_others_cannot(chromium, tmp_path) -> None:
    classifier = ("--model-dir", str(DEMO_BUNDLES / "shapes_classify"))
    with (
        running_service(tmp_path / "page.log", *classifier) as page_origin,
        running_service(
            tmp_path / "allowing.log", *classifier, "--cors-origin", page_origin, "--api-key", KEY
        ) as allowing,
        running_service(tmp_path / "not.log", *classifier, "--api-key", KEY) as not_allowing,
        open_browser(chromium) as driver,
    ):
        driver.set_script_timeout(60)
        # A document of the page's origin (another port of 127.0.0.1) without the
        # try-it page's Content-Security-Policy, which lets its script call only its own.
        driver.get(page_origin + "/healthz")
        seen = driver.execute_async_script(POST_FROM_PAGE, f"{allowing}/classify", KEY)
        assert seen.get("status") == 200, seen
        assert seen["body"]["results"][0]["top_k"][0]["label"] == "square"
        assert len(seen["requestId"]) == 32  # an exposed header
        wrong = driver.execute_async_script(POST_FROM_PAGE, f"{allowing}/classify", "wrong")
        assert wrong.get("status") == 401 and wrong["body"]["error"] == "unauthorized", wrong
        refused = driver.execute_async_script(POST_FROM_PAGE, f"{not_allowing}/classify", KEY)
        assert refused == {"failed": "TypeError: Failed to fetch"}
