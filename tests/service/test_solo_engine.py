"""--solo-engine: beside K one-thread instances, one engine over all the CPUs runs a lone
request; what arrives while it runs, and every batch of more than one item, goes to the
instances. Its answers are the official ones, as the instances' are."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import anyio
import numpy as np
import pytest
from pydantic import ValidationError

from hornet_bundle import load_bundle
from service.cpus import available_cpus
from service.engines import create_engine
from service.pipelines import pipeline_for
from service.settings import Settings
from service.testing import running_server
from tests.helpers import demo
from tests.helpers.engines import InstrumentedFactory
from tests.helpers.images import encode, upload
from tests.helpers.references import official_probabilities, scores_by_index
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio

SOLO = dict(instances=2, engine_threads=1, solo_engine=True)


def _solo_count(metrics: str, model: str) -> float:
    line = f'hornet_solo_batches_total{{model="{model}"}} '
    (value,) = [row[len(line) :] for row in metrics.splitlines() if row.startswith(line)]
    return float(value)


async def test_a_lone_request_runs_on_the_solo_engine_a_batch_on_an_instance(
    classifier_dir, photos
) -> None:
    factory = InstrumentedFactory()
    names = ["chelsea", "astronaut", "coffee"]
    async with serving([classifier_dir], engine_factory=factory, **SOLO) as client:
        *instances, solo = factory.engines
        made = factory.settings
        warm = [len(engine.batch_sizes) for engine in factory.engines]
        lone = []
        for name in names:
            response = await client.post(
                "/classify", params={"top_k": 10}, files=upload(encode(photos[name]))
            )
            assert response.status_code == 200, response.text
            lone.append(response.json()["results"][0])
        together = await client.post(
            "/classify", params={"top_k": 10}, files=upload(*(encode(photos[n]) for n in names))
        )
        info = (await client.get("/v1/models")).json()["models"][0]
        metrics = (await client.get("/metrics")).text
    # Made: two one-thread instances, then the solo engine over every CPU.
    assert [(s.instances, s.engine_thread_count) for s in made] == [
        (2, 1),
        (2, 1),
        (1, available_cpus()),
    ]
    ran = [engine.batch_sizes[w:] for engine, w in zip(factory.engines, warm, strict=True)]
    assert ran[2] == [1, 1, 1]  # each lone request on the solo engine
    assert sorted(ran[0] + ran[1]) == [1, 2]  # three images at once: the instances
    assert _solo_count(metrics, "tiny_cls") == 3.0
    assert info["batching"]["solo_engine"] is True and info["batching"]["instances"] == 2
    assert info["weight_copies"] == 3  # instances made by a factory share nothing; solo its own
    # Both kinds of engine answer the official probabilities.
    batched = together.json()["results"]
    for name, alone, in_batch in zip(names, lone, batched, strict=True):
        expected = official_probabilities(photos[name])
        for result in (alone, in_batch):
            got = scores_by_index(result)
            np.testing.assert_allclose([got[i] for i in range(10)], expected, atol=1e-5)
    assert len(instances) == 2 and solo is factory.engines[2]


async def test_requests_arriving_while_the_solo_engine_runs_go_to_the_instances(
    classifier_dir, photos
) -> None:
    factory = InstrumentedFactory()
    async with serving([classifier_dir], engine_factory=factory, **SOLO) as client:
        a, b, solo = factory.engines
        warm = [len(engine.batch_sizes) for engine in factory.engines]
        solo.hold()
        async with anyio.create_task_group() as group:
            answers: list = []

            async def post(name: str) -> None:
                response = await client.post("/classify", files=upload(encode(photos[name])))
                answers.append(response.status_code)

            group.start_soon(post, "chelsea")
            with anyio.fail_after(20):
                while len(solo.batch_sizes) == warm[2]:
                    await anyio.sleep(0.01)
            for name in ("astronaut", "coffee", "rocket"):
                group.start_soon(post, name)
            await anyio.sleep(0.5)
            # While the solo engine holds its batch no instance has run anything.
            assert [len(e.batch_sizes) for e in (a, b)] == warm[:2]
            solo.release()
        assert answers == [200] * 4
    ran = [engine.batch_sizes[w:] for engine, w in zip(factory.engines, warm, strict=True)]
    assert ran[2][0] == 1 and sum(ran[0] + ran[1]) + sum(ran[2][1:]) == 3


@pytest.mark.parametrize(
    "overrides",
    [dict(instances=1, solo_engine=True), dict(instances=2, device="cuda", solo_engine=True)],
    ids=["one instance", "cuda"],
)
def test_the_solo_engine_needs_instances_on_the_cpu(overrides) -> None:
    with pytest.raises(ValidationError, match="--solo-engine runs beside --instances 2 or more"):
        Settings(model_dir=[demo.bundle_dir("classify")], **overrides)


def test_a_server_process_runs_lone_requests_on_its_solo_engine(tmp_path) -> None:
    """`python -m service` with the flag: the lone requests counted on the solo engine;
    and `hornet serve` refusing it with one instance (exit 2, the sentence)."""
    image = encode(np.full((64, 64, 3), 200, np.uint8))
    flags = ["--model-dir", str(demo.bundle_dir("classify"))]
    flags += ["--instances", "2", "--engine-threads", "1", "--solo-engine"]
    with running_server(flags) as server:
        for _ in range(2):
            request = urllib.request.Request(
                f"{server.url}/classify", data=image, headers={"content-type": "image/png"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200 and json.load(response)["results"]
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
    assert _solo_count(metrics, demo.DEMO_NAMES["classify"]) == 2.0
    refused = subprocess.run(
        [sys.executable, "-m", "service", *flags[:2], "--solo-engine"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "--solo-engine runs beside --instances 2 or more" in refused.stderr


def test_the_solo_engine_compiles_only_the_batch_it_runs() -> None:
    """With --openvino-static-shapes the instances compile a model per batch size (8, 4,
    2, 1) and the solo engine, which the batcher gives one item at a time, only size 1:
    five compiled models where eight had been (bench/README.md); its answers are the
    instances'."""
    settings = Settings(
        model_dir=[demo.bundle_dir("classify")],
        engine="openvino",
        openvino_static_shapes=True,
        **SOLO,
    )
    bundle = load_bundle(demo.bundle_dir("classify"))
    instance = create_engine(bundle, settings)
    solo = create_engine(bundle, settings.for_solo_engine())
    try:
        assert instance.static_sizes == (8, 4, 2, 1)
        assert solo.static_sizes == (1,)
        pipeline = pipeline_for(bundle.manifest)
        item = pipeline.warmup_items()[0]
        alone, together = pipeline.run_batch(solo, [item]), pipeline.run_batch(instance, [item] * 3)
        np.testing.assert_allclose(alone[0], together[2], rtol=1e-4, atol=1e-5)
    finally:
        instance.close()
        solo.close()
