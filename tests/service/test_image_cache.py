"""Pillow's image block cache (service.memory.configure_image_cache, --image-cache-mib).

With glibc's mmap threshold fixed at 1 MiB (P8's memory bound), every image-sized block
is a fresh mapping, and each of its 4 KiB pages costs a page fault when first written.
The cache hands freed blocks to the next image instead, and the releaser empties it as
soon as images stop coming. Checked on real server processes: the page faults per
camera photo with and without the cache, and the memory after the last photo."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from PIL import Image

from service import memory
from service.settings import DEMO_BUNDLES_DIR, Settings
from service.testing import running_server
from tests.helpers.images import encode, phone_photo
from tests.helpers.memory import memory_of

MIB = 1 << 20
PAGE = 4096
PHOTOS = 6


@pytest.fixture
def pillow_cache():
    """Pillow's cache as a test leaves it: none, as in any process that did not ask."""
    yield
    Image.core.set_blocks_max(0)


def test_the_size_is_counted_in_pillows_blocks(pillow_cache) -> None:
    assert Image.core.get_block_size() == 16 * MIB
    assert memory.configure_image_cache(128) == 8
    assert Image.core.get_blocks_max() == 8
    assert memory.configure_image_cache(20) == 1
    assert memory.configure_image_cache(0) == 0
    assert Image.core.get_blocks_max() == 0


def test_the_default_is_96_mib_per_decoding_thread() -> None:
    assert Settings(decode_threads=3).image_cache_size_mib == 288
    assert Settings(decode_threads=3, image_cache_mib=0).image_cache_size_mib == 0
    assert Settings(image_cache_mib=40).image_cache_size_mib == 40


def test_the_releaser_keeps_the_cache_while_images_come_and_empties_it_after(
    pillow_cache,
) -> None:
    memory.configure_image_cache(64)

    async def scenario() -> tuple[list[int], int]:
        releaser = memory.MemoryReleaser(interval_s=0.05)
        task = asyncio.create_task(releaser.run())
        cached_while_busy = []
        try:
            for _ in range(30):  # 0.3 s of images, six of the releaser's ticks
                Image.new("RGB", (4032, 3024))  # three 16 MiB blocks, freed at once
                cached_while_busy.append(Image.core.get_stats()["blocks_cached"])
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            return cached_while_busy, Image.core.get_stats()["blocks_cached"]
        finally:
            task.cancel()

    cached_while_busy, cached_after = asyncio.run(scenario())
    assert cached_while_busy == [3] * 30
    assert cached_after == 0


def _minor_faults(pid: int) -> int:
    """Page faults served without I/O, every thread of the process (proc(5) field 10)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[7])


def _serve_photos(tmp_path, photo: bytes, flags: list[str]) -> tuple[float, int, int]:
    """Page faults per photo while the server classifies PHOTOS photos one at a time
    (after one more that fills the cache), its resident memory over its warm idle just
    after them and 3 s later."""
    bundle = DEMO_BUNDLES_DIR / "shapes_classify"
    flags = ["--model-dir", str(bundle), "--decode-threads", "1", *flags]
    log_path = tmp_path / f"server{len(flags)}.log"
    headers = {"Content-Type": "image/jpeg"}
    with running_server(flags, log_path=log_path, memory_limit_bytes=8 << 30) as (url, proc, _):
        with httpx.Client(timeout=60) as client:
            small = encode(Image.new("RGB", (64, 64), (128, 128, 128)), "JPEG")
            assert client.post(f"{url}/classify", content=small, headers=headers).is_success
            assert client.post(f"{url}/classify", content=photo, headers=headers).is_success
            time.sleep(2.0)  # past the releaser's ticks: the cache and the arenas emptied
            idle = memory_of(proc.pid)["VmRSS"]
            # the first photo fills the cache again
            assert client.post(f"{url}/classify", content=photo, headers=headers).is_success
            faults = _minor_faults(proc.pid)
            for _ in range(PHOTOS):
                answer = client.post(f"{url}/classify", content=photo, headers=headers)
                assert answer.status_code == 200, answer.text[:300]
            per_photo = (_minor_faults(proc.pid) - faults) / PHOTOS
            just_after = memory_of(proc.pid)["VmRSS"] - idle
            time.sleep(3.0)
            later = memory_of(proc.pid)["VmRSS"] - idle
    return per_photo, just_after, later


def test_cached_blocks_spare_the_page_faults_and_go_when_the_photos_stop(tmp_path, photos) -> None:
    """A 4032x3024 photo decodes into 48 MiB (RGB is stored 4 bytes a pixel): 12288 pages,
    each a fault when it is a fresh mapping. The cache reuses them photo after photo."""
    photo = phone_photo(photos["astronaut"])
    decoded_pages = 4032 * 3024 * 4 // PAGE
    without, _, _ = _serve_photos(tmp_path, photo, ["--image-cache-mib", "0"])
    with_cache, just_after, later = _serve_photos(tmp_path, photo, [])
    print(
        f"minor page faults per 12 MP photo: {without:.0f} without the cache, "
        f"{with_cache:.0f} with it ({decoded_pages} pages decoded); resident over idle "
        f"just after the photos {just_after / MIB:.0f} MiB, 3 s later {later / MIB:.0f} MiB"
    )
    # The measurement sees the decoded image's pages where every block is fresh ...
    assert without > decoded_pages
    # ... and the cache spares most of them (what is left, about 2000 a photo: the request
    # body's copies in fresh pages; decode and preprocess alone fault about 650 times).
    assert with_cache < without - 0.75 * decoded_pages
    # The cache held the blocks after the last photo, and emptied them once photos stopped.
    assert just_after > 24 * MIB
    assert later < 16 * MIB
