"""An upload's structure, checked before decoding (service.image_structure): a JPEG's
scans, marker segments and stray bytes, a PNG's chunks, a GIF's extension blocks and
stray bytes, a TIFF's or an EXIF block's first directory, counted as the stream has them
(against Pillow's own reading where it has one), and files past the limits refused
before any pixel is decoded."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, PpmImagePlugin

from service import image_structure, imaging
from service.errors import BadImage, PayloadTooLarge, ServiceError, UnsupportedMediaType
from service.image_structure import (
    MAX_GIF_BLOCKS,
    MAX_GIF_SKIPPED_BYTES,
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_SKIPPED_BYTES,
    MAX_PNG_CHUNKS,
    MAX_TIFF_ENTRIES,
    MAX_TIFF_RAW_PIECES,
    MAX_TIFF_TILE_PIXELS,
    MAX_TIFF_VALUE_BYTES,
    check_exif,
    check_structure,
    gif_structure,
    jpeg_structure,
    png_chunks,
    tiff_directory,
    tiff_layouts,
)
from tests.helpers.images import (
    after_soi,
    encode,
    exif_block,
    gif_comment,
    gif_with,
    many_scan_jpeg,
    png_chunk,
    png_with_chunks,
    tiff_file,
    tiff_structure,
)

# Bytes per value of the TIFF 6.0 numeric types (and BigTIFF's 16-18); 1, 2, 6 and 7
# are bytes and text.
_VALUE_SIZES = {3: 2, 4: 4, 5: 8, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


# IFD entries (tag, type, count, value): n unknown SHORT tags, an X resolution of n
# rationals
def _unknown_tags(n: int, order: str = "<") -> tuple[tuple[int, int, int, bytes], ...]:
    return tuple((40000 + i, 3, 1, struct.pack(f"{order}H", i)) for i in range(n))


def _resolution(n: int, order: str = "<") -> tuple[int, int, int, bytes]:
    return (282, 5, n, struct.pack(f"{order}{2 * n}I", *([72, 1] * n)))


def _grey(height: int = 48, width: int = 64) -> np.ndarray:
    return (np.arange(height * width) % 251).astype(np.uint8).reshape(height, width)


def _small_jpeg() -> bytes:
    return encode(np.full((48, 64, 3), 90, np.uint8), "JPEG")


def test_jpeg_scans_are_counted_as_the_stream_has_them(photos) -> None:
    baseline = encode(photos["chelsea"], "JPEG")
    progressive = encode(photos["chelsea"], "JPEG", progressive=True)
    assert jpeg_structure(baseline, 500).scans == 1
    assert jpeg_structure(progressive, 500).scans == 10  # libjpeg's progressive script
    # marker bytes inside a segment (a comment here, an EXIF thumbnail in photos) are not scans
    commented = encode(photos["chelsea"], "JPEG", comment=b"\xff\xda" * 1000)
    assert commented.count(b"\xff\xda") == 1001 and jpeg_structure(commented, 500).scans == 1
    # an MPO's second picture is not decoded, so its scans do not count
    buffer = io.BytesIO()
    first, second = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["coffee"])
    first.save(buffer, "MPO", save_all=True, append_images=[second], progressive=True)
    assert buffer.getvalue().count(b"\xff\xda") >= 20
    assert jpeg_structure(buffer.getvalue(), 500).scans == 10
    plain, bomb = many_scan_jpeg(64, 64, 1000)
    assert jpeg_structure(plain, 500).scans == 10
    assert jpeg_structure(bomb, 10**6).scans == 1010
    assert jpeg_structure(bomb, 500).scans == 501  # stops once over the limit


def test_ordinary_files_are_far_from_every_limit(photos) -> None:
    for data in (
        encode(photos["chelsea"], "JPEG"),
        encode(photos["chelsea"], "JPEG", progressive=True),
        encode(photos["chelsea"], "JPEG", exif=Image.Exif(), icc_profile=b"\0" * 200_000),
    ):
        found = jpeg_structure(data, 500)
        assert found.segments < 40 and found.skipped == 0, found
        check_structure(data)
    png = encode(photos["chelsea"], "PNG")
    assert png_chunks(png) < 10
    check_structure(png)


def test_jpeg_segments_and_stray_bytes_are_counted() -> None:
    jpeg = _small_jpeg()
    ordinary = jpeg_structure(jpeg, 500)
    flooded = after_soi(jpeg, b"\xff\xe5\x00\x02" * 100)  # 100 empty APP5 segments
    assert jpeg_structure(flooded, 500).segments == ordinary.segments + 100
    filled = after_soi(jpeg, b"\xff" * 1000)  # fill bytes before the first marker
    assert jpeg_structure(filled, 500).skipped == 1000
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    stray = jpeg[:app0_end] + b"junk" * 10 + b"\xff\x00" * 5 + jpeg[app0_end:]
    assert jpeg_structure(stray, 500).skipped == 50
    # and the files still decode as they did
    expected = np.asarray(imaging.decode_image(jpeg, max_pixels=10**6).image)
    for data in (flooded, filled, stray):
        got = np.asarray(imaging.decode_image(data, max_pixels=10**6).image)
        np.testing.assert_array_equal(got, expected)


def test_png_chunks_are_counted_up_to_iend() -> None:
    png = encode(np.full((48, 64, 3), 90, np.uint8), "PNG")
    ordinary = png_chunks(png)
    assert png_chunks(png_with_chunks(100, b"abCd")) == ordinary + 100
    assert png_chunks(png + png_chunk(b"abCd") * 100) == ordinary  # after IEND: not read


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        (
            "scans",
            lambda: many_scan_jpeg(256, 128, 600)[1],
            "more than 500 scans.*--max-jpeg-scans",
        ),
        (
            "segments",
            lambda: after_soi(_small_jpeg(), b"\xff\xe5\x00\x02" * MAX_JPEG_SEGMENTS),
            f"more than {MAX_JPEG_SEGMENTS} marker segments",
        ),
        (
            "fill bytes",
            lambda: after_soi(_small_jpeg(), b"\xff" * (MAX_JPEG_SKIPPED_BYTES + 2)),
            f"more than {MAX_JPEG_SKIPPED_BYTES} fill or stray bytes",
        ),
        (
            "stuffed bytes",
            lambda: after_soi(_small_jpeg(), b"\xff\xe5\x00\x02" + b"\xff\x00" * 40_000),
            "fill or stray bytes",
        ),
        (
            "png chunks",
            lambda: png_with_chunks(MAX_PNG_CHUNKS, b"abCd"),
            f"more than {MAX_PNG_CHUNKS} chunks",
        ),
        (
            "png image data chunks",
            lambda: png_with_chunks(MAX_PNG_CHUNKS, b"IDAT"),
            f"more than {MAX_PNG_CHUNKS} chunks",
        ),
        (
            "gif comment sub-blocks",
            lambda: gif_with(gif_comment([b"x"] * MAX_GIF_BLOCKS)),
            f"more than {MAX_GIF_BLOCKS} extension blocks",
        ),
        (
            "gif empty extensions",
            lambda: gif_with(b"\x21\xfe\x00" * (MAX_GIF_BLOCKS + 1)),
            f"more than {MAX_GIF_BLOCKS} extension blocks",
        ),
        (
            "gif stray bytes",
            lambda: gif_with(b"\x00" * (MAX_GIF_SKIPPED_BYTES + 1)),
            f"more than {MAX_GIF_SKIPPED_BYTES} stray bytes",
        ),
        (
            "tiff entries",
            lambda: tiff_file(_grey(), extra_entries=_unknown_tags(MAX_TIFF_ENTRIES)),
            f"over the limit of {MAX_TIFF_ENTRIES}",
        ),
        (
            "bigtiff entries",
            lambda: tiff_file(_grey(), big=True, extra_entries=_unknown_tags(MAX_TIFF_ENTRIES)),
            f"over the limit of {MAX_TIFF_ENTRIES}",
        ),
        (
            "big-endian bigtiff entries",
            lambda: tiff_file(
                _grey(), big=True, order=">", extra_entries=_unknown_tags(MAX_TIFF_ENTRIES, ">")
            ),
            f"over the limit of {MAX_TIFF_ENTRIES}",
        ),
        (
            "tiff numeric values",
            lambda: tiff_file(_grey(), extra_entries=(_resolution(MAX_TIFF_VALUE_BYTES // 8),)),
            f"bytes of numeric values.*over the limit of {MAX_TIFF_VALUE_BYTES}",
        ),
        (
            "uncompressed tiff tiles",
            lambda: tiff_file(_grey(224, 224), tile=(1, 1)),
            f"50176 strips or tiles, over the limit of {MAX_TIFF_RAW_PIECES}",
        ),
        (
            "tiff tiles larger than the image",
            lambda: tiff_file(_grey(64, 64), tile=(4096, 1025), deflate=True),
            f"tiles of 4198400 pixels, larger than its image and than {MAX_TIFF_TILE_PIXELS}",
        ),
        (
            "uncompressed tiff strips",
            lambda: tiff_file(_grey(MAX_TIFF_RAW_PIECES + 1, 1), rows_per_strip=1),
            f"strips or tiles, over the limit of {MAX_TIFF_RAW_PIECES}",
        ),
    ],
)
def test_a_file_past_a_limit_is_refused_before_pillow_reads_it(
    monkeypatch, name, make, message
) -> None:
    data = make()
    monkeypatch.setattr(Image, "open", lambda *_a, **_k: pytest.fail("opened"))
    with pytest.raises(PayloadTooLarge, match=message):
        imaging.decode_image(data, max_pixels=10**6)


def test_the_scan_limit_is_the_setting(monkeypatch) -> None:
    plain, bomb = many_scan_jpeg(256, 128, 600)
    expected = np.asarray(imaging.decode_image(plain, max_pixels=10**6).image)
    with pytest.raises(PayloadTooLarge, match="more than 609 scans"):
        imaging.decode_image(bomb, max_pixels=10**6, max_jpeg_scans=609)
    # at the limit it decodes, and the repeated scans change no pixel here
    decoded = imaging.decode_image(bomb, max_pixels=10**6, max_jpeg_scans=610).image
    np.testing.assert_array_equal(np.asarray(decoded), expected)


def test_the_walk_stops_at_its_limits() -> None:
    """The check's own work is bounded by the limits, whatever the file's length."""
    endless = after_soi(_small_jpeg(), b"\xff\xe5\x00\x02" * (10 * MAX_JPEG_SEGMENTS))
    assert jpeg_structure(endless, 500).segments == MAX_JPEG_SEGMENTS + 1
    many = png_with_chunks(3 * MAX_PNG_CHUNKS, b"abCd")
    assert png_chunks(many) == MAX_PNG_CHUNKS + 1
    assert image_structure.DEFAULT_MAX_JPEG_SCANS == 500


def test_gif_extension_blocks_and_stray_bytes_are_counted(photos) -> None:
    """Pillow's own GIFs (still, commented, animated with a loop and transparency) are
    far from the limits; a comment's sub-blocks and its terminator count one each, stray
    bytes one each, only before the first image; the flooded files decode as before."""
    still = encode(photos["chelsea"], "GIF")
    commented = encode(photos["chelsea"], "GIF", comment=b"made here" * 100)
    frames = [Image.fromarray(photos[name]).convert("P") for name in ("chelsea", "coffee")]
    animated = io.BytesIO()
    frames[0].save(
        animated,
        "GIF",
        save_all=True,
        append_images=frames[1:],
        loop=0,
        duration=40,
        transparency=0,
    )
    for data in (still, commented, animated.getvalue()):
        found = gif_structure(data)
        assert found.blocks < 20 and found.skipped == 0, found
        check_structure(data)
    plain = gif_with(b"")
    assert gif_structure(plain) == image_structure.GifStructure(0, 0)
    comment = gif_with(gif_comment([b"ab", b"c", b"d" * 255]))
    assert gif_structure(comment) == image_structure.GifStructure(4, 0)
    stray = gif_with(b"\x00\x07" * 50 + gif_comment([b"x"]))
    assert gif_structure(stray) == image_structure.GifStructure(2, 100)
    later = plain[:-1] + gif_comment([b"x"] * (2 * MAX_GIF_BLOCKS)) + b";"  # after the image
    assert gif_structure(later) == image_structure.GifStructure(0, 0)
    expected = np.asarray(imaging.decode_image(plain, max_pixels=10**6).image)
    for data in (comment, stray, later):
        got = np.asarray(imaging.decode_image(data, max_pixels=10**6).image)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize(
    "layout", [{}, {"rows_per_strip": 1}, {"rows_per_strip": 5}, {"tile": (16, 16)}]
)
def test_the_tiff_directory_is_read_as_pillow_reads_it(big, order, deflate, layout) -> None:
    """Entries, strips or tiles and numeric value bytes as Pillow's own parse of the same
    file has them, on TIFFs written from the spec (tests/helpers/images.tiff_file), which
    decode to their pixels; Pillow 13 cannot read a big-endian BigTIFF, so that one is
    checked both ways and each reading against the file's layout."""
    grey = _grey(37, 53)
    extra = (_resolution(1, order), (270, 2, 6, b"hello\0"), *_unknown_tags(3, order))
    data = tiff_file(grey, big=big, order=order, deflate=deflate, extra_entries=extra, **layout)
    readings = {reading: tiff_directory(data, reading) for reading in tiff_layouts(data)}
    assert big in readings
    found = readings[big]
    assert found is not None
    check_structure(data)
    if big and order == ">":
        assert set(readings) == {False, True}
        with pytest.raises(UnsupportedMediaType):
            imaging.decode_image(data, max_pixels=10**6)
        return
    assert list(readings) == [big]
    image = Image.open(io.BytesIO(data))
    tags = image.tag_v2
    pieces = tags[324 if "tile" in layout else 273]
    numeric = sum(
        (len(tags[tag]) if isinstance(tags[tag], tuple) else 1) * _VALUE_SIZES[tags.tagtype[tag]]
        for tag in tags
        if tags.tagtype[tag] in _VALUE_SIZES and tag not in (259, 273, 279, 324, 325)
    )
    assert (found.entries, found.pieces) == (len(tags), len(pieces))
    assert found.uncompressed == (image.info["compression"] == "raw") == (not deflate)
    assert found.value_bytes == numeric
    assert found.image_pixels == image.width * image.height == 53 * 37
    assert found.tile_pixels == (tags[322] * tags[323] if "tile" in layout else 0)
    np.testing.assert_array_equal(
        np.asarray(imaging.decode_image(data, max_pixels=10**6).image)[..., 0], grey
    )


def test_compressed_tiffs_in_many_strips_are_not_limited() -> None:
    """libtiff decodes a compressed TIFF whole, in C: 60,000 LZW strips (Pillow's
    writer, one row each) decode in milliseconds, so only uncompressed files have the
    strip and tile limit."""
    grey = _grey(60_000, 2)
    data = encode(Image.fromarray(grey), "TIFF", compression="tiff_lzw", strip_size=1)
    found = tiff_directory(data, False)
    assert found is not None and found.pieces == 60_000 and not found.uncompressed
    decoded = imaging.decode_image(data, max_pixels=10**6).image
    np.testing.assert_array_equal(np.asarray(decoded)[..., 0], grey)


def _orientation(value: int) -> tuple[int, int, int, bytes]:
    return (0x0112, 3, 1, struct.pack("<H", value))


def _with_exif(fmt: str, block: bytes, array: np.ndarray) -> bytes:
    """`array` as a PNG (eXIf chunk), WebP (EXIF chunk, lossless) or JPEG (APP1)
    carrying `block`, written by Pillow."""
    options = {"lossless": True} if fmt == "WEBP" else {}
    return encode(array, fmt, exif=b"Exif\x00\x00" + block, **options)


def test_an_ordinary_exif_block_passes(photos) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera maker"
    exif[0x0110] = "Camera model"
    exif[0x011A] = 300.0
    exif[0x0131] = "firmware 1.0"
    check_exif(exif.tobytes())
    check_exif(b"Exif\x00\x00" + exif.tobytes())
    check_exif(b"not an EXIF block")  # left to Pillow, as any malformed file
    data = encode(photos["chelsea"], "JPEG", exif=exif)
    assert imaging.decode_image(data, max_pixels=10**6).size == (300, 451)  # turned


_MANY_ENTRIES = (*_unknown_tags(MAX_TIFF_ENTRIES), _orientation(6))
_MANY_VALUES = (_resolution(MAX_TIFF_VALUE_BYTES // 8 + 1), _orientation(6))


@pytest.mark.parametrize(
    ("fmt", "entries", "message"),
    [
        ("PNG", _MANY_ENTRIES, "EXIF has 4001 entries"),
        ("WEBP", _MANY_ENTRIES, "EXIF has 4001 entries"),
        ("JPEG", _MANY_ENTRIES, "EXIF has 4001 entries"),
        ("PNG", _MANY_VALUES, "numeric values"),
        ("WEBP", _MANY_VALUES, "numeric values"),
    ],
)
def test_an_exif_block_past_the_limits_is_refused_before_pillow_reads_it(
    monkeypatch, fmt, entries, message
) -> None:
    """PNG and WebP carry EXIF blocks as long as the upload; Pillow reads their first
    directory as a TIFF's. A JPEG's APP1 segment holds at most 64 KiB (room for 5,000
    entries, not for the values), and Pillow reads it as it opens the file, for its
    resolution: refused after that bounded read."""
    block = exif_block(list(entries))
    data = _with_exif(fmt, block, np.full((8, 16, 3), 90, np.uint8))
    if fmt != "JPEG":
        monkeypatch.setattr(Image.Image, "getexif", lambda *_a: pytest.fail("EXIF read"))
    with pytest.raises(PayloadTooLarge, match=message):
        imaging.decode_image(data, max_pixels=10**6)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "RAW PROFILE"])
def test_orientation_is_applied_without_re_encoding_the_exif_block(monkeypatch, fmt) -> None:
    """Orientation 6 with 0.9 MB of other EXIF values (under the limit): the image turns
    as Pillow's exif_transpose turns it, from an EXIF chunk, a TIFF's own directory, or
    ImageMagick's hex "Raw profile type exif" text, and the block is not re-encoded
    (Pillow's exif_transpose re-encodes every tag of it when it is kept: 16 MB of values
    took 4 s and 0.9 GB)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    entries = [_orientation(6), _resolution(110_000)]
    block = exif_block(entries)
    if fmt == "TIFF":
        grey = array[..., 0]
        data = tiff_file(grey, extra_entries=tuple(entries))
        array = np.stack([grey] * 3, axis=-1)
    elif fmt == "RAW PROFILE":
        profile = block.hex()
        text = f"\nexif\n{len(block):8}\n" + "\n".join(
            profile[i : i + 72] for i in range(0, len(profile), 72)
        )
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("Raw profile type exif", text)
        data = encode(array, "PNG", pnginfo=info)
    else:
        data = _with_exif(fmt, block, array)
    expected = np.asarray(Image.fromarray(array).transpose(Image.Transpose.ROTATE_270))
    monkeypatch.setattr(Image.Exif, "tobytes", lambda *_a: pytest.fail("EXIF re-encoded"))
    decoded = imaging.decode_image(data, max_pixels=10**6)
    assert decoded.size == (8, 16)
    np.testing.assert_array_equal(np.asarray(decoded.image), expected)


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "ICO", "SGI"])
def test_other_formats_are_refused_before_their_plugin_reads_them(monkeypatch, fmt) -> None:
    """Pillow opens these too, each plugin reading its header in Python; only the
    supported formats' plugins are tried, so the upload gets 415, naming the format from
    its magic bytes, untouched."""
    data = encode(np.full((16, 16, 3), 90, np.uint8), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow would open it
    monkeypatch.setattr(
        PpmImagePlugin.PpmImageFile, "_open", lambda *_a: pytest.fail("plugin opened it")
    )
    for plugin in Image.ID:
        factory, _ = Image.OPEN[plugin]
        if plugin not in imaging.SUPPORTED_FORMATS and isinstance(factory, type):
            monkeypatch.setattr(factory, "_open", lambda *_a: pytest.fail("plugin read it"))
    with pytest.raises(UnsupportedMediaType, match=f"its first bytes are {fmt}'s"):
        imaging.decode_image(data, max_pixels=10**6)


@pytest.mark.parametrize("data", [b"G", b"\xff\xfe}", b"\x00", b"not an image at all"])
def test_a_few_bytes_of_nothing_are_415(data) -> None:
    """Short junk: no plugin opens it, and naming a format must not trip on a check that
    needs more bytes than there are (Pillow's DIB check unpacks 4; found by fuzzing)."""
    with pytest.raises(UnsupportedMediaType, match="not a recognised image"):
        imaging.decode_image(data, max_pixels=10**6)


def test_tiles_may_be_larger_than_a_small_image() -> None:
    """A small image in one tile of a writer's usual size (here 256x256 for 100x100, and
    2048x2048 at the limit) decodes; so does a large image in tiles smaller than it."""
    for grey, tile in (
        (_grey(100, 100), (256, 256)),
        (_grey(64, 64), (2048, 2048)),
        (_grey(1200, 1100), (1024, 1024)),
    ):
        data = tiff_file(grey, tile=tile, deflate=True)
        assert tiff_directory(data, False).tile_pixels <= MAX_TIFF_TILE_PIXELS
        decoded = imaging.decode_image(data, max_pixels=10**7).image
        np.testing.assert_array_equal(np.asarray(decoded)[..., 0], grey)


def _raw_8x8_tiff(strip_offset: tuple[int, int, int, bytes], big: bool = False) -> bytes:
    entries = [
        (256, 4, 1, struct.pack("<I", 8)),
        (257, 4, 1, struct.pack("<I", 8)),
        (258, 3, 1, struct.pack("<H", 8)),
        (259, 3, 1, struct.pack("<H", 1)),
        (262, 3, 1, struct.pack("<H", 1)),
        (277, 3, 1, struct.pack("<H", 1)),
        (278, 4, 1, struct.pack("<I", 8)),
        (279, 4, 1, struct.pack("<I", 64)),
        strip_offset,
    ]
    return tiff_structure(bytes(64), sorted(entries), big, "<")


@pytest.mark.parametrize(
    "data",
    [
        _raw_8x8_tiff((273, 11, 1, struct.pack("<f", 8.0))),  # a FLOAT strip offset
        _raw_8x8_tiff((273, 16, 1, struct.pack("<Q", 2**64 - 1)), big=True),
    ],
    ids=["float strip offset", "strip offset past 2**63"],
)
def test_tiff_values_of_the_wrong_type_or_size_are_bad_images(data) -> None:
    """Pillow lets these reach its decoding loop as TypeError and OverflowError (found by
    fuzzing): a 400 like any malformed file, not a server error."""
    with pytest.raises(BadImage, match="undecodable or truncated TIFF image"):
        imaging.decode_image(data, max_pixels=10**6)


def test_mutated_files_of_every_format_give_service_errors_only(photos) -> None:
    """5,000 seeded mutations (bytes overwritten, words set to 0, 1, 0xFFFF or 2**32-1,
    runs deleted or inserted) of small files in every supported format and layout:
    decoding either succeeds or raises the service's own errors (4xx), nothing else."""
    rng = np.random.default_rng(0)
    array = photos["coffee"][:24, :32]
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [
        encode(array, "JPEG", exif=exif),
        encode(array, "JPEG", progressive=True),
        encode(array, "PNG", exif=exif),
        encode(Image.fromarray(array).convert("P"), "PNG"),
        encode(array, "WEBP", exif=exif),
        encode(array, "WEBP", lossless=True),
        encode(array, "BMP"),
        gif_with(gif_comment([b"hi"]), array),
        tiff_file(array[..., 0], rows_per_strip=4),
        tiff_file(array[..., 0], tile=(16, 16), deflate=True),
        tiff_file(array[..., 0], big=True, rows_per_strip=3),
        encode(array, "TIFF", compression="tiff_lzw"),
    ]
    words = [0, 1, 0xFFFF, 0xFFFFFFFF]
    for case in range(5000):
        data = bytearray(seeds[case % len(seeds)])
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(len(data)))
            kind = rng.random()
            if kind < 0.5:
                data[at] = int(rng.integers(256))
            elif kind < 0.7:
                data[at : at + 4] = struct.pack("<I", words[int(rng.integers(len(words)))])
            elif kind < 0.85:
                del data[at : at + int(rng.integers(1, 16))]
            else:
                data[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), np.uint8).tobytes()
        try:
            imaging.decode_image(bytes(data), max_pixels=10**6)
        except ServiceError as exc:
            assert 400 <= exc.status_code < 500, exc
