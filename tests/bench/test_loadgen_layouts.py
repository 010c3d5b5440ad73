"""bench/loadgen.py's raw-engine reference: which layouts of engines it measures. On the
CPU every layout of the cores; on CUDA, where each engine built plans its convolutions
again (the fp16 graph about 7 s per static session on an H200), the server's layout and
a few engines side by side, never one engine per core."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.helpers.bench import bench_module


@pytest.fixture(scope="module")
def loadgen():
    with bench_module("loadgen") as module:
        yield module


def test_the_cpu_reference_covers_spinning_and_every_layout_of_the_cores(loadgen):
    layouts = loadgen.raw_layouts(Settings(max_batch_size=8), cpus=16)
    every = [1, 2, 4, 6, 8]
    assert layouts == [
        ((1, 0), False, every, ""),
        ((1, 0), True, every, ""),
        ((16, 1), False, [4, 8], "@16x1"),
    ]
    # A server on one single-thread engine per core gets the one-engine layout instead.
    served = Settings(max_batch_size=8, instances=16, engine_threads=1)
    assert [tag for *_, tag in loadgen.raw_layouts(served, cpus=16)] == ["", "", "@1x16"]


def test_the_cuda_reference_is_the_servers_layout_and_four_engines(loadgen):
    layouts = loadgen.raw_layouts(Settings(max_batch_size=32, device="cuda"), cpus=16)
    assert layouts[0] == ((1, 0), False, [1, *range(2, 33, 2)], "")
    assert layouts[1:] == [((4, 0), False, [16, 32], "@4x")]
    four = Settings(max_batch_size=32, device="cuda", instances=4)
    assert [tag for *_, tag in loadgen.raw_layouts(four, cpus=16)] == [""]


def test_a_detector_is_measured_one_image_per_call(loadgen):
    """The detector's pipeline runs a batch as a loop of single images: batch 1 alone."""
    layouts = loadgen.raw_layouts(Settings(max_batch_size=8), cpus=2, one_per_call=True)
    assert [(sizes, tag) for _, _, sizes, tag in layouts] == [([1], ""), ([1], ""), ([1], "@2x1")]
    cuda = Settings(max_batch_size=8, device="cuda")
    assert [sizes for *_, sizes, _ in loadgen.raw_layouts(cuda, 16, one_per_call=True)] == [
        [1],
        [1],
    ]
