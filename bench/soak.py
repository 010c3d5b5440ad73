"""Soak test for `hornet serve`: mixed traffic for a fixed time, checked for 5xx, wrong
answers, memory growth and latency drift.

    python bench/soak.py --duration 600 --json soak.json

Steps:
  1. the server: `python -m service` (the demo models unless --model-dir) on a free
     loopback port, its address space capped (--memory-limit-gb), its stderr kept in a
     log file; or --url of one already running (loopback only); wait for /readyz;
  2. a fixed pool of synthetic shapes images (model_export.demo.shapes) in a few sizes,
     PNG and JPEG; each image's answer from one request at a time is its reference;
  3. for --duration seconds, --concurrency workers send a weighted mix: valid images to
     every route (raw body, multipart, KServe v2 JSON), bad inputs, clients that hang up
     mid-upload or cancel mid-request; every --burst-every seconds a burst of 100-200
     simultaneous requests overflows the batch queue; the server's RSS is read each second;
  4. the report (below); then /readyz must still be 200 and SIGTERM must end the server
     with status 0.

Failures (exit status 1): any 5xx other than 503 overloaded/not_ready, seen by a client
or recorded in the server's /metrics; an answer that differs from its reference; a bad
input not answered 4xx with an "error" body; a valid request whose connection the
server dropped; requests still in flight after the traffic stopped; an RSS slope over
--max-rss-slope-mb-per-min in the second half of a run of at least 5 minutes (shorter
runs report it unjudged, see SLOPE_MIN_DURATION_S); not ready at the end; an
unclean exit. p50/p99 latency per route, first third against last third, is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from loadgen import cpu_seconds, serving
from PIL import Image

from model_export.demo import shapes

REPO = Path(__file__).resolve().parents[1]
# Tolerances against the single-request reference. Batched and single engine calls gave
# bit-identical outputs here (ONNX Runtime CPU, 1 and 2 threads, batches of 2-8 mixed
# images: max difference 0), so any difference at all is suspect; the margins only
# leave room for kernels whose summation order depends on the batch size (other CPUs,
# GPUs), which move float32 results by a few ulps.
SCORE_TOLERANCE = 1e-5  # probabilities and logits, absolute
# An ulp-level change can flip a segmentation argmax only where two classes tie, on
# region borders: a few pixels in a thousand.
MIN_MASK_AGREEMENT = 0.999
# Detection runs one image per engine call, so batching cannot change its input; boxes
# are in input pixels, where float32 rounding at 400 px is about 3e-5.
BOX_TOLERANCE_PX = 1e-3

IMAGE_SIZES = ((96, 96), (240, 160), (320, 240))  # width, height
IMAGE_FORMATS = ("PNG", "JPEG")
SCENES_PER_SIZE = 2
BURST_SIZE = (100, 200)
CANCEL_AFTER_S = (0.002, 0.05)
OK_503_ERRORS = ("overloaded", "not_ready")
MAX_EXAMPLES = 10
# The RSS slope is judged only over runs this long. Each burst leaves the allocator a
# little higher, so a short second half holding one or two bursts shows steps, not a
# trend: the second-half slope measured +90 MB/min over 30 s, +2.0 over 3 min and +0.4
# over 10 min of the same traffic, with RSS flat after the first minute.
SLOPE_MIN_DURATION_S = 300.0
RSS_INTERVAL_S = 1.0

# Kinds of request a worker sends, with their weights in the mix.
VALID_KINDS = {
    "classify/raw": 8,
    "classify/multipart": 4,
    "v2/classify": 4,
    "segment/raw": 6,
    "segment/multipart": 3,
    "detect/raw": 4,
    "detect/multipart": 2,
}
BAD_KINDS = {
    "bad/truncated_png": 1,
    "bad/corrupt_jpeg": 1,
    "bad/text_as_image": 1,
    "bad/empty_body": 1,
    "bad/unknown_model": 1,
    "bad/bad_query": 1,
    "bad/multipart_without_file": 1,
    "bad/v2_bad_base64": 1,
    "bad/thin_image": 2,
    "bad/huge_content_length": 1,
}
DISCONNECT_KINDS = {"disconnect/partial_body": 3, "disconnect/cancelled": 3}


@dataclass(frozen=True)
class Sample:
    """One encoded image of the pool."""

    key: str
    data: bytes
    content_type: str


@dataclass(frozen=True)
class Model:
    name: str
    task: str


@dataclass
class Outcome:
    """What one request got. `status` is the HTTP status, or 'cancelled', 'closed' (we
    hung up on purpose) or 'transport_error'; `problem` says why it is a failure."""

    kind: str
    route: str
    started: float
    seconds: float
    status: int | str
    request_id: str
    problem: str | None = None
    failure: str | None = None  # five_xx | wrong | unexpected
    shed: bool = False
    valid: bool = False


@dataclass
class Soak:
    """Everything the traffic needs: the server, the image pool and the references."""

    url: str
    models: list[Model]
    samples: dict[str, list[Sample]]  # task -> pool
    references: dict[tuple[str, str, str], Any]  # (form, model, sample key) -> answer
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    sequence: int = 0

    def next_id(self, kind: str) -> str:
        self.sequence += 1
        return f"soak-{self.sequence}-{kind.replace('/', '-')}"

    def models_for(self, task: str) -> list[Model]:
        return [m for m in self.models if m.task == task]


# --- the image pool and the references -------------------------------------------------


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def image_pool(task: str, seed: int) -> list[Sample]:
    """Shapes scenes in every size and format: one centred shape for classifiers (what
    they were trained on), several anywhere for the dense tasks."""
    rng = np.random.default_rng([seed, ["classify", "segment", "detect"].index(task)])
    scene = shapes.generate_sample_scene if task == "classify" else shapes.generate_scene
    pool = []
    for width, height in IMAGE_SIZES:
        for n in range(SCENES_PER_SIZE):
            image = scene(rng, height, width).image
            for fmt in IMAGE_FORMATS:
                key = f"{task}-{width}x{height}-{n}.{fmt.lower()}"
                pool.append(Sample(key, encode(image, fmt), f"image/{fmt.lower()}"))
    return pool


def served_models(url: str) -> list[Model]:
    answer = httpx.get(f"{url}/v1/models", timeout=30).json()
    return [Model(m["name"], m["task"]) for m in answer["models"]]


def v2_body(data: bytes) -> dict:
    encoded = base64.b64encode(data).decode("ascii")
    return {
        "inputs": [{"name": "encoded_image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]
    }


def single_request(client: httpx.Client, form: str, model: Model, sample: Sample) -> dict:
    """`sample`'s answer from `model` through `form` (the task's route with a raw body, or
    'v2'), asked alone."""
    if form == "v2":
        response = client.post(f"/v2/models/{model.name}/infer", json=v2_body(sample.data))
    else:
        response = client.post(
            f"/{form}",
            params={"model": model.name},
            content=sample.data,
            headers={"content-type": sample.content_type},
        )
    if response.status_code != 200:
        raise SystemExit(
            f"reference answer for {sample.key} from {model.name} ({form}): "
            f"{response.status_code} {response.text[:300]}"
        )
    return response.json()


def reference_answers(
    url: str, models: list[Model], samples: dict[str, list[Sample]]
) -> dict[tuple[str, str, str], Any]:
    """Each image's answer from each model, one request at a time (nothing to batch
    with), keyed (form, model, sample); the multipart forms are checked against the
    raw-body answer."""
    references = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for model in models:
            forms = [model.task, *(["v2"] if model.task == "classify" else [])]
            for sample in samples[model.task]:
                for form in forms:
                    answer = single_request(client, form, model, sample)
                    references[(form, model.name, sample.key)] = answer
    return references


# --- comparing an answer with its reference ---------------------------------------------


def classify_mismatch(expected: dict, got: dict) -> str | None:
    want, have = expected["results"][0]["top_k"], got["results"][0]["top_k"]
    if [c["index"] for c in want] != [c["index"] for c in have]:
        return f"top-k {[c['index'] for c in have]}, reference {[c['index'] for c in want]}"
    worst = max(abs(a["score"] - b["score"]) for a, b in zip(want, have, strict=True))
    if worst > SCORE_TOLERANCE:
        return f"scores differ from the reference by up to {worst:.3g}"
    return None


def decode_mask(mask_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_png))))


def segment_mismatch(expected: dict, got: dict) -> str | None:
    want, have = expected["results"][0], got["results"][0]
    if (want["width"], want["height"]) != (have["width"], have["height"]):
        return f"size {have['width']}x{have['height']}, reference {want['width']}x{want['height']}"
    agreement = float(np.mean(decode_mask(want["mask_png"]) == decode_mask(have["mask_png"])))
    if agreement < MIN_MASK_AGREEMENT:
        return f"mask agrees with the reference on {agreement:.4%} of pixels"
    return None


def rle_agreement(a: dict, b: dict) -> float:
    """Pixel agreement of two COCO RLE masks over their union (1.0 when both empty)."""
    from pycocotools import mask as coco_mask

    masks = [coco_mask.decode({"size": m["size"], "counts": m["counts"].encode()}) for m in (a, b)]
    union = np.count_nonzero(masks[0] | masks[1])
    return 1.0 - np.count_nonzero(masks[0] != masks[1]) / union if union else 1.0


def detect_mismatch(expected: dict, got: dict) -> str | None:
    """Detections in the same order (the model sorts by score) with equal labels."""
    want, have = expected["results"][0]["detections"], got["results"][0]["detections"]
    if [d["index"] for d in want] != [d["index"] for d in have]:
        return f"labels {[d['index'] for d in have]}, reference {[d['index'] for d in want]}"
    for n, (a, b) in enumerate(zip(want, have, strict=True)):
        box_error = max(abs(x - y) for x, y in zip(a["box"], b["box"], strict=True))
        if box_error > BOX_TOLERANCE_PX:
            return f"detection {n}: box off by {box_error:.3g} px"
        if abs(a["score"] - b["score"]) > SCORE_TOLERANCE:
            return f"detection {n}: score {b['score']}, reference {a['score']}"
        if (a["mask"] is None) != (b["mask"] is None):
            return f"detection {n}: mask present in only one of answer and reference"
        if a["mask"] is not None and rle_agreement(a["mask"], b["mask"]) < MIN_MASK_AGREEMENT:
            return f"detection {n}: mask differs from the reference"
    return None


def v2_mismatch(expected: dict, got: dict) -> str | None:
    want = {o["name"]: np.asarray(o["data"]) for o in expected["outputs"]}
    have = {o["name"]: np.asarray(o["data"]) for o in got["outputs"]}
    if want.keys() != have.keys():
        return f"outputs {sorted(have)}, reference {sorted(want)}"
    for name, values in want.items():
        if values.shape != have[name].shape:
            return f"output {name} has shape {have[name].shape}, reference {values.shape}"
        worst = float(np.max(np.abs(values - have[name]), initial=0.0))
        if worst > SCORE_TOLERANCE:
            return f"output {name} differs from the reference by up to {worst:.3g}"
    return None


MISMATCH: dict[str, Callable[[dict, dict], str | None]] = {
    "classify": classify_mismatch,
    "segment": segment_mismatch,
    "detect": detect_mismatch,
    "v2": v2_mismatch,
}


# --- judging answers ---------------------------------------------------------------------


def error_body(response: httpx.Response) -> str | None:
    """The body's "error" string, or None when the body is no JSON object with one."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def judge_valid(outcome: Outcome, response: httpx.Response, form: str, reference: dict) -> None:
    """200 equal to the reference; 503 overloaded/not_ready with Retry-After is shedding."""
    outcome.valid = True
    if response.status_code == 200:
        outcome.problem = MISMATCH[form](reference, response.json())
        outcome.failure = "wrong" if outcome.problem else None
    elif response.status_code == 503 and (error_body(response) or "").startswith(OK_503_ERRORS):
        outcome.shed = True
        if "retry-after" not in response.headers:
            outcome.failure, outcome.problem = "unexpected", "503 without Retry-After"
    else:
        outcome.failure = "five_xx" if response.status_code >= 500 else "unexpected"
        outcome.problem = f"{response.status_code} {response.text[:300]}"


def judge_bad(outcome: Outcome, status: int, error: str | None, ok_200: bool, text: str) -> None:
    """A 4xx with an "error" body (200 too where the input has a well-defined answer)."""
    if status == 503 and (error or "").startswith(OK_503_ERRORS):
        outcome.shed = True
    elif status >= 500:
        outcome.failure = "five_xx"
    elif not ((400 <= status < 500 and error) or (status == 200 and ok_200)):
        outcome.failure = "unexpected"
    if outcome.failure:
        outcome.problem = f"{status} {text[:300]}"


# --- the requests ------------------------------------------------------------------------


async def send_valid(
    soak: Soak,
    client: httpx.AsyncClient,
    kind: str,
    rng: random.Random,
    cancel_after: float | None = None,
) -> Outcome:
    """One valid image to `kind`'s route ('task/raw', 'task/multipart' or 'v2/classify')."""
    route_kind, body = kind.split("/")
    task = "classify" if route_kind == "v2" else route_kind
    model = rng.choice(soak.models_for(task))
    sample = rng.choice(soak.samples[task])
    rid = soak.next_id(kind)
    headers = {"x-request-id": rid}
    if route_kind == "v2":
        route, form = "/v2/models/{model}/infer", "v2"
        request = client.build_request(
            "POST", f"/v2/models/{model.name}/infer", json=v2_body(sample.data), headers=headers
        )
    else:
        route, form, params = f"/{task}", task, {"model": model.name}
        if body == "multipart":
            files = [("file", (sample.key, sample.data, sample.content_type))]
            request = client.build_request(
                "POST", route, params=params, files=files, headers=headers
            )
        else:
            headers["content-type"] = sample.content_type
            request = client.build_request(
                "POST", route, params=params, content=sample.data, headers=headers
            )
    outcome = Outcome(kind, route, time.perf_counter() - soak.started, 0.0, "", rid)
    sent = time.perf_counter()
    try:
        async with asyncio.timeout(cancel_after):
            response = await client.send(request)
    except TimeoutError:
        outcome.status = "cancelled"
        return outcome
    except httpx.TransportError as exc:
        return dropped(outcome, exc)
    outcome.seconds = time.perf_counter() - sent
    outcome.status = response.status_code
    judge_valid(outcome, response, form, soak.references[(form, model.name, sample.key)])
    return outcome


def corrupt_jpeg(data: bytes) -> bytes:
    """The JPEG with its first Huffman table's 16 code counts set to 255 (they must sum
    to at most 256): the header parses, decoding fails. Noise in the scan data instead
    is not reliably an error: libjpeg decodes through much of it with a warning."""
    at = data.index(b"\xff\xc4")  # DHT marker, 2-byte length, class/id byte, 16 counts
    return data[: at + 5] + b"\xff" * 16 + data[at + 21 :]


def thin_image(rng: random.Random) -> bytes:
    """1x4000 or 4000x1 pixels. Resized to a model's input it becomes enormous (73 x
    292000 for a 64 px classifier) or zero pixels wide (segmentation, detection): the
    service may answer it or refuse it with a 4xx, but not fail or blow up its memory."""
    shape = (1, 4000, 3) if rng.random() < 0.5 else (4000, 1, 3)
    return encode(np.full(shape, 128, dtype=np.uint8), "PNG")


@dataclass(frozen=True)
class BadRequest:
    """A bad or awkward input: where it goes and what it sends; `ok_200` when an answer
    is as right as a 4xx."""

    path: str
    params: dict
    content: bytes | None = None
    content_type: str = "image/png"
    files: list | None = None
    json: dict | None = None
    ok_200: bool = False


def bad_request(soak: Soak, kind: str, rng: random.Random) -> BadRequest:
    name = kind.split("/")[1]
    tasks = sorted({m.task for m in soak.models})
    if name == "bad_query":  # the routes with query parameters of their own
        tasks = [t for t in tasks if t in ("classify", "detect")] or tasks
    task = "classify" if name == "v2_bad_base64" else rng.choice(tasks)
    model = rng.choice(soak.models_for(task)).name
    path, params = f"/{task}", {"model": model}
    png = next(s for s in soak.samples[task] if s.content_type == "image/png").data
    jpeg = next(s for s in soak.samples[task] if s.content_type == "image/jpeg").data
    if name == "truncated_png":
        return BadRequest(path, params, png[: len(png) // 2])
    if name == "corrupt_jpeg":
        return BadRequest(path, params, corrupt_jpeg(jpeg), "image/jpeg")
    if name == "text_as_image":
        return BadRequest(path, params, b"not an image at all\n" * 20, "image/jpeg")
    if name == "empty_body":
        return BadRequest(path, params, b"")
    if name == "unknown_model":
        return BadRequest(path, {"model": "no_such_model"}, png)
    if name == "bad_query":
        query = {"classify": {"top_k": 0}, "detect": {"score_threshold": 2}}.get(task, {})
        return BadRequest(path, {**params, **query, "model": model if query else ""}, png)
    if name == "multipart_without_file":
        return BadRequest(path, params, files=[("image", ("a.png", png, "image/png"))])
    if name == "v2_bad_base64":
        tensor = {"name": "encoded_image", "shape": [1], "datatype": "BYTES", "data": ["no!"]}
        return BadRequest(f"/v2/models/{model}/infer", {}, json={"inputs": [tensor]})
    if name == "thin_image":
        return BadRequest(path, params, thin_image(rng), ok_200=True)
    raise ValueError(f"unknown bad-input kind {kind!r}")


async def send_bad(soak: Soak, client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
    if kind == "bad/huge_content_length":
        return await send_huge_content_length(soak, kind)
    bad = bad_request(soak, kind, rng)
    rid = soak.next_id(kind)
    route = "/v2/models/{model}/infer" if bad.path.startswith("/v2") else bad.path
    outcome = Outcome(kind, route, time.perf_counter() - soak.started, 0.0, "", rid)
    headers = {"x-request-id": rid}
    if bad.content is not None:
        headers["content-type"] = bad.content_type
    sent = time.perf_counter()
    try:
        response = await client.post(
            bad.path,
            params=bad.params,
            headers=headers,
            content=bad.content,
            files=bad.files,
            json=bad.json,
        )
    except httpx.TransportError as exc:
        return dropped(outcome, exc)
    outcome.seconds = time.perf_counter() - sent
    outcome.status = response.status_code
    judge_bad(outcome, response.status_code, error_body(response), bad.ok_200, response.text)
    return outcome


def dropped(outcome: Outcome, exc: Exception) -> Outcome:
    """A request whose connection the server closed before answering."""
    outcome.status, outcome.failure = "transport_error", "unexpected"
    outcome.problem = f"connection dropped: {type(exc).__name__} {exc}"
    return outcome


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


async def send_huge_content_length(soak: Soak, kind: str) -> Outcome:
    """Headers declaring a 100 GB body and nothing after them: 413 at once, no waiting."""
    rid = soak.next_id(kind)
    outcome = Outcome(kind, "/classify", time.perf_counter() - soak.started, 0.0, "", rid)
    head = (
        "POST /classify HTTP/1.1\r\nHost: soak\r\nContent-Type: image/png\r\n"
        f"Content-Length: 100000000000\r\nX-Request-ID: {rid}\r\n\r\n"
    )
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(*host_port(soak.url))
    try:
        writer.write(head.encode("ascii"))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    except (OSError, TimeoutError) as exc:
        outcome.status, outcome.failure = "transport_error", "unexpected"
        outcome.problem = f"no answer to a huge Content-Length: {type(exc).__name__} {exc}"
        return outcome
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    outcome.seconds = time.perf_counter() - sent
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1]) if head_bytes.startswith(b"HTTP/") else 0
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    outcome.status = status
    judge_bad(outcome, status, error, False, answer.decode("latin-1"))
    return outcome


async def send_partial_body(soak: Soak, kind: str, rng: random.Random) -> Outcome:
    """Headers and part of a valid image, then hang up without reading the answer."""
    task = rng.choice(sorted({m.task for m in soak.models}))
    model = rng.choice(soak.models_for(task)).name
    sample = rng.choice(soak.samples[task])
    rid = soak.next_id(kind)
    outcome = Outcome(kind, f"/{task}", time.perf_counter() - soak.started, 0.0, "closed", rid)
    head = (
        f"POST /{task}?model={model} HTTP/1.1\r\nHost: soak\r\n"
        f"Content-Type: {sample.content_type}\r\nContent-Length: {len(sample.data)}\r\n"
        f"X-Request-ID: {rid}\r\n\r\n"
    )
    part = sample.data[: rng.randrange(1, len(sample.data))]
    _, writer = await asyncio.open_connection(*host_port(soak.url))
    try:
        writer.write(head.encode("ascii") + part)
        await writer.drain()
        await asyncio.sleep(rng.uniform(0, 0.02))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return outcome


async def send_one(soak: Soak, client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
    if kind in VALID_KINDS:
        return await send_valid(soak, client, kind, rng)
    if kind in BAD_KINDS:
        return await send_bad(soak, client, kind, rng)
    if kind == "disconnect/partial_body":
        return await send_partial_body(soak, kind, rng)
    valid = sorted(k for k in traffic_weights(soak.models) if k in VALID_KINDS)
    cancelled_kind = rng.choice(valid)
    outcome = await send_valid(soak, client, cancelled_kind, rng, rng.uniform(*CANCEL_AFTER_S))
    outcome.kind, outcome.valid = kind, False  # finished ones are still checked, not timed
    return outcome


# --- the traffic -------------------------------------------------------------------------


class Deck:
    """Kinds drawn without replacement from a shuffled deck holding each kind `weight`
    times, so even a short run sends every kind; refilled when empty."""

    def __init__(self, weights: dict[str, int], rng: random.Random) -> None:
        self.weights = weights
        self.rng = rng
        self.cards: list[str] = []

    def draw(self) -> str:
        if not self.cards:
            self.cards = [k for k, w in self.weights.items() for _ in range(w)]
            self.rng.shuffle(self.cards)
        return self.cards.pop()


def task_needed(kind: str) -> str | None:
    """The task a kind of request needs a model of (None: any model does)."""
    prefix = kind.split("/")[0]
    if prefix == "v2" or kind == "bad/v2_bad_base64":
        return "classify"
    return prefix if prefix in ("classify", "segment", "detect") else None


def traffic_weights(models: list[Model]) -> dict[str, int]:
    """The mix, less the kinds the served models cannot take."""
    tasks = {m.task for m in models}
    weights = {**VALID_KINDS, **BAD_KINDS, **DISCONNECT_KINDS}
    return {k: w for k, w in weights.items() if task_needed(k) in (None, *tasks)}


async def worker(
    soak: Soak, client: httpx.AsyncClient, deck: Deck, rng: random.Random, stop_at: float
) -> None:
    while time.perf_counter() < stop_at:
        soak.outcomes.append(await send_one(soak, client, deck.draw(), rng))


async def bursts(soak: Soak, every_s: float, rng: random.Random, stop_at: float) -> None:
    """Every `every_s` seconds (the first at half that), 100-200 valid requests at once."""
    valid = [k for k in traffic_weights(soak.models) if k in VALID_KINDS]
    limits = httpx.Limits(max_connections=BURST_SIZE[1], max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=soak.url, timeout=120, limits=limits) as client:
        next_at = soak.started + every_s / 2
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            count = rng.randint(*BURST_SIZE)
            kinds = [rng.choice(valid) for _ in range(count)]
            results = await asyncio.gather(*(send_valid(soak, client, k, rng) for k in kinds))
            for outcome in results:
                outcome.kind, outcome.valid = f"burst/{outcome.kind}", False
            soak.outcomes.extend(results)
            next_at += every_s


def read_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


async def sample_server(
    pid: int | None, soak: Soak, stop_at: float, rss: list[tuple], load: list[tuple]
) -> None:
    """Each second: the server's RSS (s, MB), and the machine's 1-minute load average
    with the server's CPU seconds so far (s, load, cpu), to tell a slower server from a
    busier machine."""
    while time.perf_counter() < stop_at:
        at = time.perf_counter() - soak.started
        mb = read_rss_mb(pid) if pid is not None else None
        if mb is not None:
            rss.append((at, mb))
        cpu = cpu_seconds([pid]) if pid is not None else None
        load.append((at, os.getloadavg()[0], cpu))
        await asyncio.sleep(RSS_INTERVAL_S)


async def run_traffic(
    soak: Soak, args: argparse.Namespace, pid: int | None
) -> tuple[list[tuple], list[tuple], dict]:
    """The mixed traffic for --duration seconds; returns the RSS and load samples (see
    sample_server) and the CPU seconds the server and this client spent meanwhile (they
    share the machine)."""
    rss: list[tuple] = []
    load: list[tuple] = []
    deck = Deck(traffic_weights(soak.models), random.Random(args.seed))
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    server_cpu = cpu_seconds([pid]) if pid is not None else None
    client_cpu = time.process_time()
    async with httpx.AsyncClient(base_url=soak.url, timeout=120, limits=limits) as client:
        soak.started = time.perf_counter()
        stop_at = soak.started + args.duration
        tasks = [
            worker(soak, client, deck, random.Random(args.seed * 1000 + n), stop_at)
            for n in range(args.concurrency)
        ]
        tasks.append(bursts(soak, args.burst_every, random.Random(args.seed - 1), stop_at))
        tasks.append(sample_server(pid, soak, stop_at, rss, load))
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - soak.started
    server_end = cpu_seconds([pid]) if pid is not None else None
    cpu = {
        "wall_s": round(elapsed, 1),
        "client_s": round(time.process_time() - client_cpu, 1),
        "server_s": round(server_end - server_cpu, 1) if server_end and server_cpu else None,
    }
    return rss, load, cpu


# --- the server --------------------------------------------------------------------------


def server_flags(args: argparse.Namespace) -> list[str]:
    """`python -m service` flags: the soak's models, warnings and errors logged."""
    return [
        "--log-level",
        "warning",
        "--engine-threads",
        str(args.engine_threads),
        *(f for d in args.model_dir for f in ("--model-dir", str(d))),
    ]


def scrape_metrics(url: str) -> tuple[Counter, float]:
    """hornet_requests_total by (route, status), and hornet_in_flight_requests."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: Counter = Counter()
    in_flight = 0.0
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hornet_requests_total":
                counts[(sample.labels["route"], sample.labels["status"])] += sample.value
            elif sample.name == "hornet_in_flight_requests":
                in_flight = sample.value
    return counts, in_flight


def settle_in_flight(url: str, wait_s: float = 10.0) -> float:
    """Requests still in flight apart from the /metrics scrape itself, after waiting up
    to `wait_s` for the last cancelled ones to be noticed."""
    give_up_at = time.monotonic() + wait_s
    while True:
        in_flight = scrape_metrics(url)[1] - 1
        if in_flight <= 0 or time.monotonic() > give_up_at:
            return in_flight
        time.sleep(0.5)


def stop_server(process: subprocess.Popen, wait_s: float = 60.0) -> tuple[int | None, float]:
    """SIGTERM and the exit status (None if it had to be killed) and the seconds it took."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(wait_s), time.monotonic() - sent
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None, time.monotonic() - sent


def error_log_lines(log_path: Path) -> list[dict]:
    """The server's error-level JSON lines, and any stderr line that is not JSON."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            found.append({"raw": line[:300]})
            continue
        if entry.get("level") in ("error", "critical"):
            exception = entry.get("exception", "").strip().splitlines()
            found.append(
                {
                    "time": entry.get("time"),
                    "message": entry.get("message", "").strip(),
                    "request_id": entry.get("request_id"),
                    "exception": exception[-1] if exception else None,
                }
            )
    return found


# --- the report --------------------------------------------------------------------------


def rss_report(samples: list[tuple[float, float]], duration: float) -> dict | None:
    """Start/end/peak MB and the least-squares slope over the second half, in MB/min."""
    if not samples:
        return None
    late = [(t, mb) for t, mb in samples if t >= duration / 2]
    slope = float(np.polyfit(*zip(*late, strict=True), 1)[0]) * 60 if len(late) > 2 else 0.0
    values = [mb for _, mb in samples]
    return {
        "start_mb": round(values[0], 1),
        "end_mb": round(values[-1], 1),
        "peak_mb": round(max(values), 1),
        "slope_mb_per_min": round(slope, 3),
        "samples": [(round(t, 1), round(mb, 1)) for t, mb in samples],
    }


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return {"n": len(latencies), "p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1)}


def latency_report(outcomes: list[Outcome], duration: float) -> dict:
    """p50/p99 of answered valid worker requests per route, first third vs last third."""
    report = {}
    by_route: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.valid and o.status == 200 and not o.failure:
            by_route[o.route].append(o)
    for route, done in sorted(by_route.items()):
        first = percentiles([o.seconds for o in done if o.started < duration / 3])
        last = percentiles([o.seconds for o in done if o.started >= 2 * duration / 3])
        drift = last["p99_ms"] / first["p99_ms"] if first["n"] and last["n"] else None
        report[route] = {
            "first_third": first,
            "last_third": last,
            "p99_drift": round(drift, 3) if drift else None,
        }
    return report


def error_summary(lines: list[dict]) -> list[dict]:
    """The server's error-log lines grouped by message and exception, most frequent first."""
    counts = Counter((e.get("message") or e.get("raw"), e.get("exception")) for e in lines)
    return [
        {"message": message, "exception": exception, "count": count}
        for (message, exception), count in counts.most_common()
    ]


def machine_report(load: list[tuple], duration: float) -> dict:
    """Per third of the run: the machine's mean 1-minute load average and the cores the
    server used (None without its pid)."""
    report = {}
    for name, start, stop in (
        ("first_third", 0, duration / 3),
        ("last_third", 2 * duration / 3, duration),
    ):
        rows = [row for row in load if start <= row[0] < stop]
        if len(rows) < 2:
            continue
        (t0, _, cpu0), (t1, _, cpu1) = rows[0], rows[-1]
        cores = (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None else None
        report[name] = {
            "load_avg_1m": round(float(np.mean([row[1] for row in rows])), 2),
            "server_cores": round(cores, 2) if cores is not None else None,
        }
    return report


def examples(outcomes: list[Outcome], failure: str) -> list[dict]:
    found = [o for o in outcomes if o.failure == failure][:MAX_EXAMPLES]
    return [
        {"kind": o.kind, "request_id": o.request_id, "status": o.status, "problem": o.problem}
        for o in found
    ]


def build_report(soak: Soak, args: argparse.Namespace, rss: list, extra: dict) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in soak.outcomes:
        by_kind[o.kind][str(o.status)] += 1
    failures = Counter(o.failure for o in soak.outcomes if o.failure)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "kinds": sorted(traffic_weights(soak.models)) + ["burst"],
        "requests": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "requests_total": len(soak.outcomes),
        "shed_503": sum(o.shed for o in soak.outcomes),
        "five_xx": failures["five_xx"],
        "wrong_answers": failures["wrong"],
        "unexpected": failures["unexpected"],
        "five_xx_examples": examples(soak.outcomes, "five_xx"),
        "wrong_examples": examples(soak.outcomes, "wrong"),
        "unexpected_examples": examples(soak.outcomes, "unexpected"),
        "rss": rss_report(rss, args.duration),
        "latency": latency_report(soak.outcomes, args.duration),
        **extra,
    }
    judged = args.duration >= SLOPE_MIN_DURATION_S
    report["rss_slope_limit"] = args.max_rss_slope_mb_per_min if judged else None
    report["failures"] = failure_reasons(report)
    report["passed"] = not report["failures"]
    return report


def failure_reasons(report: dict) -> list[str]:
    reasons = []
    if report["five_xx"]:
        reasons.append(f"{report['five_xx']} answers were 5xx (not 503 overloaded/not_ready)")
    if report["server_five_xx"]:
        reasons.append(f"the server's /metrics recorded 5xx: {report['server_five_xx']}")
    if report["wrong_answers"]:
        reasons.append(f"{report['wrong_answers']} answers differ from their reference")
    if report["unexpected"]:
        reasons.append(f"{report['unexpected']} unexpected answers or dropped connections")
    if report["in_flight_at_end"]:
        reasons.append(f"{report['in_flight_at_end']} requests still in flight at the end")
    rss = report["rss"]
    limit = report["rss_slope_limit"]
    if rss and limit is not None and rss["slope_mb_per_min"] > limit:
        reasons.append(f"RSS grew {rss['slope_mb_per_min']} MB/min (limit {limit})")
    if not report["ready_at_end"]:
        reasons.append("/readyz was not 200 after the traffic")
    if report.get("exit_status") not in (0, "not started here"):
        reasons.append(f"the server's exit status after SIGTERM: {report['exit_status']}")
    return reasons


def print_report(report: dict) -> None:
    print(f"\n{report['command']}  ({report['date']}, {report['cpus']} cpus)")
    print(f"server {report['server']['url']} from {report['server']['source']}")
    print(
        f"{report['requests_total']} requests in {report['duration_s']:.0f} s, "
        f"concurrency {report['concurrency']}, seed {report['seed']}"
    )
    width = max(len(k) for k in report["requests"])
    for kind, statuses in report["requests"].items():
        print(f"  {kind:<{width}}  " + "  ".join(f"{s}:{n}" for s, n in statuses.items()))
    print(
        f"5xx (not 503 overloaded/not_ready): {report['five_xx']}   "
        f"server-recorded 5xx: {report['server_five_xx'] or 0}   "
        f"wrong answers: {report['wrong_answers']}   unexpected: {report['unexpected']}   "
        f"shed (503 + Retry-After): {report['shed_503']}"
    )
    for name in ("five_xx_examples", "wrong_examples", "unexpected_examples"):
        for example in report[name][:3]:
            print(f"    {name[:-9]}: {example}")
    rss = report["rss"]
    if rss:
        print(
            f"RSS MB: start {rss['start_mb']}  end {rss['end_mb']}  peak {rss['peak_mb']}  "
            f"slope over the second half {rss['slope_mb_per_min']:+.3f} MB/min "
            + (
                f"(limit {report['rss_slope_limit']})"
                if report["rss_slope_limit"] is not None
                else f"(not judged: run under {SLOPE_MIN_DURATION_S:.0f} s)"
            )
        )
    print("latency of valid requests, p50/p99 ms, first third -> last third (p99 drift):")
    for route, row in report["latency"].items():
        first, last = row["first_third"], row["last_third"]
        print(
            f"  {route:<26} {first['p50_ms']}/{first['p99_ms']} (n={first['n']}) -> "
            f"{last['p50_ms']}/{last['p99_ms']} (n={last['n']})  x{row['p99_drift']}"
        )
    for name, row in report["machine"].items():
        print(
            f"  {name.replace('_', ' ')}: machine load average {row['load_avg_1m']}, "
            f"server used {row['server_cores']} cores"
        )
    cpu = report["cpu_seconds"]
    print(
        f"CPU seconds over {cpu['wall_s']} s of traffic: server {cpu['server_s']}, "
        f"this client {cpu['client_s']} ({report['cpus']} cpus, shared with the server)"
    )
    took = f" in {report['exit_seconds']} s" if report["exit_seconds"] is not None else ""
    print(
        f"in flight at the end: {report['in_flight_at_end']}   ready at the end: "
        f"{report['ready_at_end']}   exit after SIGTERM: {report['exit_status']}{took}"
    )
    print(f"server error-log lines: {len(report['error_log'])}  (log: {report['server_log']})")
    for entry in error_summary(report["error_log"]):
        print(f"    {entry['count']} x {entry['message']}: {entry['exception']}")
    verdict = "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    print(verdict)


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop workers")
    parser.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=[],
        help="bundle to serve; repeat for several (default: the packaged demo models)",
    )
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument(
        "--max-rss-slope-mb-per-min",
        type=float,
        default=5.0,
        help="fail when RSS grows faster over the second half of a run of 5 minutes or "
        "more (default 5: over ten times the +0.4 of a 10-minute demo run, and what a leak "
        "of 4 KB per request gives at its 20 requests/s)",
    )
    parser.add_argument("--burst-every", type=float, default=30.0, help="seconds between bursts")
    parser.add_argument("--engine-threads", type=int, default=1, help="server's ORT threads")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="server RLIMIT_AS")
    parser.add_argument("--server-log", type=Path, help="server stderr (default: a temp file)")
    return parser.parse_args(argv)


def source_revision() -> str | None:
    """The commit the server ran from, and whether service/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return f"{head} + uncommitted changes under service/" if dirty else head or None


def server_5xx(before: Counter, after: Counter) -> dict[str, int]:
    """5xx other than 503 that /metrics counted between the two scrapes, by route."""
    return {
        f"{route} {status}": int(after[(route, status)] - before[(route, status)])
        for route, status in sorted(after)
        if status.startswith("5")
        and status != "503"
        and after[(route, status)] > before[(route, status)]
    }


def after_traffic(url: str, before: Counter, process: subprocess.Popen | None) -> dict:
    """What the server says once the traffic is over: 5xx it counted, requests still in
    flight, readiness; then, for a server started here, its exit on SIGTERM."""
    in_flight = settle_in_flight(url)
    found = {
        "server_five_xx": server_5xx(before, scrape_metrics(url)[0]),
        "in_flight_at_end": max(0, int(in_flight)),
        "ready_at_end": httpx.get(f"{url}/readyz", timeout=30).status_code == 200,
        "exit_status": "not started here",
        "exit_seconds": None,
    }
    if process is not None:
        status, seconds = stop_server(process)
        found.update(exit_status=status, exit_seconds=round(seconds, 2))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags, log_path = [], None
    if args.url is None:
        flags = server_flags(args)
        log_path = args.server_log or Path(tempfile.mkstemp(prefix="soak-server-")[1])
    source = source_revision()
    memory_limit = int(args.memory_limit_gb * 2**30)
    server = serving(args.url, flags, log_path=log_path, memory_limit_bytes=memory_limit)
    with server as (url, process):
        pid = args.pid if process is None else process.pid
        models = served_models(url)
        samples = {task: image_pool(task, args.seed) for task in {m.task for m in models}}
        print(
            f"server {url} (pid {pid})  models {[m.name for m in models]}  "
            f"{sum(map(len, samples.values()))} images; taking references"
        )
        soak = Soak(url, models, samples, reference_answers(url, models, samples))
        before, _ = scrape_metrics(url)
        print(f"references: {len(soak.references)}; {args.duration:.0f} s of traffic")
        rss, load, cpu = asyncio.run(run_traffic(soak, args, pid))
        found = after_traffic(url, before, process)
    error_log = error_log_lines(log_path) if log_path else []
    extra = {
        "server": {"url": url, "flags": flags, "pid": pid, "source": source},
        "server_log": str(log_path) if log_path else None,
        "cpu_seconds": cpu,
        "machine": machine_report(load, args.duration),
        **found,
        "error_log": error_log,
        "error_log_summary": error_summary(error_log),
    }
    report = build_report(soak, args, rss, extra)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
