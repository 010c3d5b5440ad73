"""The try-it page at `/`: one HTML page, its script and its stylesheet, shipped in the
package (service/static/), with no build step and nothing fetched from elsewhere.

The page calls the public API only (/v1/models, /classify, /segment, /detect) and draws
the answers on the image. It holds no secret, so it stays open when API keys are set:
the page asks for a key and sends it with each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Everything from this origin; images also from data: (the segmentation mask PNG) and
# blob: (the chosen or generated image); no inline script or style, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _static(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> FileResponse:
    """The page: pick a model, give it an image, see the answer drawn."""
    return _static("index.html", "text/html; charset=utf-8")


@router.api_route("/static/page.js", methods=["GET", "HEAD"])
async def page_script() -> FileResponse:
    return _static("page.js", "text/javascript; charset=utf-8")


@router.api_route("/static/page.css", methods=["GET", "HEAD"])
async def page_stylesheet() -> FileResponse:
    return _static("page.css", "text/css; charset=utf-8")
