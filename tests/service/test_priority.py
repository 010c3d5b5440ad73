"""Priority levels (`--priority-levels`, Triton's dynamic batching priority_levels) in a
real server: requests that ask for a higher level run before the lower ones waiting, in
the order the server's own batch log records (its verbose "batch ran" lines name the
requests each batch held); Triton's `priority` parameter through tritonclient over REST
and gRPC and the image routes' query parameter; each level with its own queue; a level
that is not one refused before its image is decoded; Triton's model configuration."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.testing import free_port, running_server
from tests.helpers.queueing import metric, queued_photo

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TIMEOUT_S = 60
LOW, HIGH = 16, 3  # requests at the default (lowest) level, then at level 1


def _server(bundle: Path, tmp_path: Path, *flags: str):
    log = tmp_path / "server.log"
    grpc_port = free_port()
    server = running_server(
        [
            "--model-dir", str(bundle), "--grpc-port", str(grpc_port),
            "--instances", "1", "--engine-threads", "1", "--max-batch-size", "1",
            "--log-level", "debug", *flags,
        ],
        log_path=log,
        inherit_settings=False,
    )  # fmt: skip
    return server, grpc_port, log


def _queue_depth(url: str) -> float:
    return metric(url, 'hornet_queue_depth{model="slow_cls"}')


def test_higher_levels_run_before_the_lower_ones_waiting(slow_classifier_dir, tmp_path):
    server, _, log = _server(slow_classifier_dir, tmp_path, "--priority-levels", "2")
    image = queued_photo()
    levels: dict[str, int] = {}
    errors: list[str] = []

    def post(level: int) -> None:
        query = f"?priority={level}" if level else ""  # 0: the default, the lowest
        answer = httpx.post(
            f"{running.url}/classify{query}",
            content=image,
            headers={"content-type": "image/jpeg"},
            timeout=TIMEOUT_S,
        )
        if answer.status_code != 200:
            errors.append(answer.text)
        levels[answer.headers["x-request-id"]] = level or 2

    with server as running:
        low = [threading.Thread(target=post, args=(0,)) for _ in range(LOW)]
        for thread in low:
            thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while _queue_depth(running.url) < LOW - 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        ahead = _queue_depth(running.url)  # low requests waiting when the high ones come
        high = [threading.Thread(target=post, args=(1,)) for _ in range(HIGH)]
        for thread in high:
            thread.start()
        for thread in low + high:
            thread.join(TIMEOUT_S)
        time.sleep(0.3)  # the last lines written
        metrics = httpx.get(f"{running.url}/metrics", timeout=TIMEOUT_S).text
    assert errors == [] and len(levels) == LOW + HIGH
    # each image's wait in the queue is counted at its level (the warm-up has none)
    counts = {
        level: float(line.split()[-1])
        for level in ("1", "2")
        for line in metrics.splitlines()
        if line.startswith(f'hornet_queue_seconds_count{{model="slow_cls",priority="{level}"}}')
    }
    assert counts == {"1": HIGH, "2": LOW}
    assert ahead >= LOW - 4, f"only {ahead} requests queued: the test could not tell"
    order = [
        levels[line["request_ids"][0]]
        for line in map(json.loads, log.read_text().splitlines())
        if line.get("message") == "batch ran" and line["request_ids"][0] in levels
    ]
    assert sorted(order) == sorted(levels.values())
    # Each high request overtook the low ones still waiting: at most the few that had
    # left the queue when it arrived (the one running, one being collected) run before
    # the high ones; first come first served, they would all have.
    last_high = max(i for i, level in enumerate(order) if level == 1)
    low_after = order[last_high + 1 :]
    assert low_after == [2] * len(low_after)
    assert len(low_after) >= ahead - HIGH - 2, order


def test_the_priority_parameter_over_every_protocol(slow_classifier_dir, tmp_path):
    server, grpc_port, log = _server(
        slow_classifier_dir, tmp_path, "--priority-levels", "3", "--default-priority-level", "2",
        "--max-queue-size", "5",
    )  # fmt: skip
    image = queued_photo()
    with server as running:
        rest = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
        remote = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        config = rest.get_model_config("slow_cls")["dynamic_batching"]
        assert config["priority_levels"] == 3 and config["default_priority_level"] == 2
        assert config["default_queue_policy"] == {"max_queue_size": 5}
        grpc_config = remote.get_model_config("slow_cls", as_json=True)["config"]
        assert grpc_config["dynamic_batching"]["priority_levels"] == "3"  # uint64 in JSON

        def inputs(client):
            module = httpclient if client is rest else grpcclient
            tensor = module.InferInput("encoded_image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
            return [tensor]

        for client in (rest, remote):
            for priority in (0, 1, 3):  # tritonclient sends none for 0
                answer = client.infer("slow_cls", inputs(client), priority=priority)
                assert answer.as_numpy("probabilities").shape == (1, 10)
            with pytest.raises(InferenceServerException) as refused:
                client.infer("slow_cls", inputs(client), priority=4)
            said = refused.value.message()
            assert "priority 4 is not a priority level of model 'slow_cls'" in said
            assert "1 (the highest) to 3, or 0 for its default level, 2" in said
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"

        url = f"{running.url}/classify"
        headers = {"content-type": "image/jpeg"}
        for query, status in (("1", 200), ("3", 200), ("4", 400), ("-1", 422), ("x", 422)):
            answer = httpx.post(f"{url}?priority={query}", content=image, headers=headers)
            assert answer.status_code == status, (query, answer.text)
            if status == 400:
                assert answer.json()["error"] == "invalid_priority"
        v2 = httpx.post(
            f"{running.url}/v2/models/slow_cls/infer",
            json={
                "parameters": {"priority": True},
                "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 224, 224, 3],
                            "data": [0] * (224 * 224 * 3)}],
            },
            timeout=TIMEOUT_S,
        )  # fmt: skip
        assert v2.status_code == 400 and "parameters.priority" in v2.json()["error"]
    # the refused requests were refused before their images were decoded or queued
    batches = [line for line in map(json.loads, log.read_text().splitlines())
               if line.get("message") == "batch ran"]  # fmt: skip
    assert len(batches) == 6 + 2  # the 6 tritonclient answers, /classify at 1 and 3


def test_each_level_has_its_own_places_in_the_queue(slow_classifier_dir, tmp_path):
    server, _, _ = _server(
        slow_classifier_dir, tmp_path, "--priority-levels", "2", "--max-queue-size", "3"
    )
    image = queued_photo()
    statuses: dict[int, list[int]] = {1: [], 2: []}

    def post(level: int) -> None:
        answer = httpx.post(
            f"{running.url}/classify?priority={level}",
            content=image,
            headers={"content-type": "image/jpeg"},
            timeout=TIMEOUT_S,
        )
        statuses[level].append(answer.status_code)

    with server as running:
        low = [threading.Thread(target=post, args=(2,)) for _ in range(12)]
        for thread in low:
            thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while _queue_depth(running.url) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        high = [threading.Thread(target=post, args=(1,)) for _ in range(3)]
        for thread in high:
            thread.start()
        for thread in low + high:
            thread.join(TIMEOUT_S)
    assert 503 in statuses[2], "the low level's queue never filled: the test could not tell"
    assert statuses[1] == [200, 200, 200]  # the full low level refused none of them


def test_a_model_of_one_level_takes_any_priority(slow_classifier_dir, tmp_path):
    """As Triton's without priority levels: a client that always sends a priority is
    served, every request at the one level; a priority that is no level at all is not."""
    server, grpc_port, _ = _server(slow_classifier_dir, tmp_path)
    image = queued_photo()
    with server as running:
        url = f"{running.url}/classify"
        headers = {"content-type": "image/jpeg"}
        for query, status in (
            ("0", 200), ("1", 200), ("7", 200), (str(2**64 - 1), 200),  # Triton's uint64
            ("-1", 422), ("1.5", 422), (str(2**64), 422),
        ):  # fmt: skip
            answer = httpx.post(f"{url}?priority={query}", content=image, headers=headers)
            assert answer.status_code == status, (query, answer.text)
        remote = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = grpcclient.InferInput("encoded_image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        answer = remote.infer("slow_cls", [tensor], priority=9)
        assert answer.as_numpy("probabilities").shape == (1, 10)
        for priority, status in ((2**64 - 1, 200), (2**64, 400), (10**400, 400)):
            v2 = httpx.post(
                f"{running.url}/v2/models/slow_cls/infer",
                json={"parameters": {"priority": priority},
                      "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 224, 224, 3],
                                  "data": [0] * (224 * 224 * 3)}]},
                timeout=TIMEOUT_S,
            )  # fmt: skip
            assert v2.status_code == status, (priority, v2.text)
        config = remote.get_model_config("slow_cls", as_json=True)["config"]
        assert "priority_levels" not in config["dynamic_batching"]
