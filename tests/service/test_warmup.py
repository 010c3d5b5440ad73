"""Warm-up at load: every engine instance runs each batch size `--warmup-batch-sizes`
asks for before the server turns ready, so no request pays for a shape the engine has
not seen (ONNX Runtime's CUDA provider plans its convolutions on each session's first
run of a shape)."""

from __future__ import annotations

import anyio
import pytest

from service.runtime import warmup_sizes
from service.settings import Settings
from tests.helpers.engines import InstrumentedFactory
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("device", "mode", "batched", "expected"),
    [
        ("cpu", "auto", True, [1]),
        # The static batch sessions' sizes (service.engines.static_sizes), largest first.
        ("cuda", "auto", True, [6, 4, 2, 1]),
        ("cpu", "all", True, [1, 2, 3, 4, 5, 6]),
        ("cuda", "one", True, [1]),
        # A pipeline that runs one image per engine call only ever shows it batch size 1.
        ("cuda", "all", False, [1]),
    ],
)
def test_which_sizes_warm_up(device, mode, batched, expected) -> None:
    settings = Settings(device=device, warmup_batch_sizes=mode, max_batch_size=6)
    assert warmup_sizes(settings, batched) == expected


def test_only_the_detector_runs_its_images_one_at_a_time() -> None:
    from service.pipelines import ClassifyPipeline, DetectPipeline, SegmentPipeline

    assert (ClassifyPipeline.batched, SegmentPipeline.batched) == (True, True)
    assert DetectPipeline.batched is False


def test_the_setting_comes_from_the_environment(monkeypatch) -> None:
    from service.cli import load_settings

    monkeypatch.setenv("HORNET_WARMUP_BATCH_SIZES", "all")
    assert load_settings([]).warmup_batch_sizes == "all"
    assert load_settings(["--warmup-batch-sizes", "one"]).warmup_batch_sizes == "one"
    with pytest.raises(SystemExit):
        load_settings(["--warmup-batch-sizes", "some"])


async def _sizes_seen_before_any_request(model_dir, **overrides) -> list[list[int]]:
    factory = InstrumentedFactory()
    async with serving([model_dir], engine_factory=factory, **overrides) as client:
        assert (await client.get("/readyz")).status_code == 200
        # Ready, and no request sent: what the engines ran is the warm-up.
        return [list(engine.batch_sizes) for engine in factory.engines]


async def test_every_instance_runs_every_batch_size_before_ready(classifier_dir) -> None:
    seen = await _sizes_seen_before_any_request(
        classifier_dir, warmup_batch_sizes="all", max_batch_size=5, instances=2
    )
    assert seen == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]


async def test_on_the_cpu_one_image_warms_up_by_default(classifier_dir) -> None:
    seen = await _sizes_seen_before_any_request(classifier_dir, max_batch_size=5)
    assert seen == [[1]]


async def test_segmentation_tiles_warm_up_in_every_batch_size(segmenter_dir) -> None:
    seen = await _sizes_seen_before_any_request(
        segmenter_dir, warmup_batch_sizes="all", max_batch_size=3
    )
    assert seen == [[1, 2, 3]]


async def test_shutting_down_stops_the_warm_up_after_the_run_in_progress(classifier_dir) -> None:
    """A server told to exit while it warms up (on CUDA an fp16 warm-up took minutes)
    exits after the run in progress: the warm-up runs in a thread the interpreter waits
    for at exit, so it must stop by itself."""
    factory = InstrumentedFactory(delay_s=0.2)
    async with serving(
        [classifier_dir],
        engine_factory=factory,
        wait_ready=False,
        warmup_batch_sizes="all",
        max_batch_size=40,
    ) as client:
        while not factory.batch_sizes:
            await anyio.sleep(0.01)
        assert (await client.get("/readyz")).status_code == 503
    await anyio.sleep(0.5)
    runs = len(factory.batch_sizes)
    await anyio.sleep(1.0)
    assert len(factory.batch_sizes) == runs, "the warm-up went on after shutdown"
    # 40 sizes at 0.2 s each would take 8 s; it stopped after the run in progress.
    assert runs <= 2
    # and the engines it had built were closed (the model never joined the pool, whose
    # shutdown closes the others).
    assert [engine.inner._sessions for engine in factory.engines] == [{}]
