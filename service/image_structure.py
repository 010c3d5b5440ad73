"""An upload's structure, checked before any decoder sees it.

`--max-pixels` bounds the image a decoder makes, not the work of getting there, and some
files cost far more per byte than their pixels do:

- **A progressive JPEG's scans.** libjpeg makes a pass over the whole image's
  coefficients for every scan and accepts any number of them (a repeated scan only
  warns); a scan that refines nothing is a few bytes. A 6000x6000 JPEG of 0.7 MB
  carrying 20,000 copies of a 23-byte scan took 19 s of CPU to decode, against 0.3 s
  without them: at the 20 MB upload limit, minutes per request, holding a decoding
  thread that no timeout can take back. Encoders write 1 (baseline) to about 10.
- **Structure that Pillow walks in Python.** A JPEG's marker segments before its first
  scan and the bytes between them, and a PNG's chunks, are read by Pillow one at a time
  in Python: 4 MB of empty APP segments took 3.2-4.2 s to open, 4 MB of 0xFF fill bytes
  3.0 s, 18 MB of empty ancillary PNG chunks 9.8 s (on a busy 2-vCPU host), where an
  ordinary image decodes at 10-30 MB a second. Ordinary files have a few dozen
  segments or chunks of metadata and tables, their image data in chunks of 8 KiB or
  more.

So a JPEG (any file Pillow would open as one: it starts FF D8 FF) may have at most
`max_scans` scans, MAX_JPEG_SEGMENTS marker segments and MAX_JPEG_SKIPPED_BYTES of fill
or stray bytes between them, and a PNG at most MAX_PNG_CHUNKS chunks; the walk skips
each segment and chunk by its length field (so an EXIF thumbnail's markers do not
count) and jumps over entropy-coded data with one regular-expression search, so its
own work is bounded by the same limits. It stops at the first EOI or IEND (an MPO's
later pictures, an APNG's frames after IEND, trailing bytes: none is decoded).
Malformed files are walked as far as they parse and left to the decoder to refuse.

The same holds for the other formats Pillow reads in Python:

- **A GIF's extensions and stray bytes before its first image**, walked by Pillow a
  sub-block or a byte at a time, a comment's sub-blocks kept as one bytes object each:
  4 MB of 1-byte comment sub-blocks took 0.7 s and 181 MB. At most MAX_GIF_BLOCKS
  extension sub-blocks and MAX_GIF_SKIPPED_BYTES stray bytes before the first image.
- **A TIFF's first image file directory (IFD)**, read entry by entry, each value it
  uses turned into Python objects, and an uncompressed TIFF decoded one Python decoder
  per strip or tile: 20 MB of 1x1 tiles took 12.9 s and 864 MB, an X resolution of 2M
  rationals 6.4 s and 331 MB, 1M BigTIFF entries 2.0 s. At most MAX_TIFF_ENTRIES entries,
  MAX_TIFF_VALUE_BYTES of numeric values besides the strip and tile tables, and, when
  uncompressed, MAX_TIFF_RAW_PIECES strips or tiles. And libtiff decodes a tile into a
  buffer of the tile's declared size, whatever the image's: a 64x64 image in one
  40000x40000 deflate tile (1.6 MB) took 5.9 s and 1.6 GB; tiles may be at most the
  image's area or MAX_TIFF_TILE_PIXELS, whichever is larger. The same IFD check applies to an
  EXIF block of any format (`check_exif`), which Pillow reads the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.errors import PayloadTooLarge

DEFAULT_MAX_JPEG_SCANS = 500
MAX_JPEG_SEGMENTS = 4000
MAX_JPEG_SKIPPED_BYTES = 64 * 1024
MAX_PNG_CHUNKS = 50_000
MAX_GIF_BLOCKS = 4000
MAX_GIF_SKIPPED_BYTES = 64 * 1024
MAX_TIFF_ENTRIES = 4000
MAX_TIFF_VALUE_BYTES = 1 << 20
MAX_TIFF_RAW_PIECES = 50_000
MAX_TIFF_TILE_PIXELS = 1 << 22  # 2048 x 2048, or the image's own area when larger

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIF_MAGICS = (b"GIF87a", b"GIF89a")
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
EXIF_PREFIX = b"Exif\x00\x00"
# After a scan's header its entropy-coded data runs to the next marker: an 0xFF that is
# neither a stuffed 0x00 nor a restart marker (RST0-RST7).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_FILL = re.compile(rb"\xff+")
_SOS, _EOI, _TEM = 0xDA, 0xD9, 0x01


@dataclass(frozen=True)
class JpegStructure:
    scans: int  # SOS segments
    segments: int  # marker segments of every kind, scans included
    skipped: int  # fill and stray bytes between segments


def jpeg_structure(data: bytes, max_scans: int) -> JpegStructure:
    """The first picture's scans, segments and skipped bytes, walked until the first EOI,
    the end of the data, or one of them passing its limit (module doc)."""
    scans = segments = skipped = 0
    pos, end = 2, len(data)
    while (
        pos + 1 < end
        and scans <= max_scans
        and segments <= MAX_JPEG_SEGMENTS
        and skipped <= MAX_JPEG_SKIPPED_BYTES
    ):
        if data[pos] != 0xFF:  # stray bytes up to the next 0xFF
            following = data.find(b"\xff", pos)
            following = end if following < 0 else following
            skipped += following - pos
            pos = following
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker: skip the run but its last
            run_end = _FILL.match(data, pos).end()  # type: ignore[union-attr]
            skipped += run_end - 1 - pos
            pos = run_end - 1
            continue
        if marker == 0x00:  # a stuffed 0xFF outside entropy-coded data
            skipped += 2
            pos += 2
            continue
        if marker == _EOI:
            break
        segments += 1
        if marker == _TEM or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if pos + 4 > end:
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == _SOS:
            scans += 1
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return JpegStructure(scans, segments, skipped)


def png_chunks(data: bytes) -> int:
    """The chunks up to IEND (or the end), counted up to MAX_PNG_CHUNKS + 1."""
    chunks, pos, end = 0, len(PNG_MAGIC), len(data)
    while pos + 8 <= end and chunks <= MAX_PNG_CHUNKS:
        chunks += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return chunks


@dataclass(frozen=True)
class GifStructure:
    blocks: int  # extension sub-blocks (terminators included) before the first image
    skipped: int  # stray bytes between blocks before the first image


def gif_structure(data: bytes) -> GifStructure:
    """What Pillow reads in Python before a GIF's first image (module doc), walked until
    the first image descriptor or trailer, the end, or a count passing its limit."""
    blocks = skipped = 0
    pos, end = 13, len(data)
    if end > 10 and data[10] & 0x80:  # the global colour table
        pos += 3 << ((data[10] & 7) + 1)
    while pos < end and blocks <= MAX_GIF_BLOCKS and skipped <= MAX_GIF_SKIPPED_BYTES:
        introducer = data[pos]
        if introducer in b",;":  # the first image, or the trailer
            break
        if introducer != 0x21:  # Pillow skips anything else a byte at a time
            skipped += 1
            pos += 1
            continue
        pos += 2  # the introducer and the label, then sub-blocks up to an empty one
        while pos < end and blocks <= MAX_GIF_BLOCKS:
            blocks += 1
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return GifStructure(blocks, skipped)


_TIFF_VALUE_SIZES = {3: 2, 4: 4, 5: 8, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
# StripOffsets, StripByteCounts, TileOffsets, TileByteCounts: one value per piece
_TIFF_PIECE_TAGS = frozenset({273, 279, 324, 325})
_TIFF_COMPRESSION = 259
_TIFF_SIZES = {256: "width", 257: "height", 322: "tile_width", 323: "tile_height"}


@dataclass(frozen=True)
class TiffDirectory:
    entries: int
    value_bytes: int  # numeric values besides the strip and tile tables
    pieces: int  # strips or tiles (the longest of their tables)
    uncompressed: bool  # Compression 1 or absent: Pillow decodes piece by piece
    image_pixels: int = 0  # ImageWidth x ImageLength
    tile_pixels: int = 0  # TileWidth x TileLength, 0 when not tiled


def tiff_layouts(data: bytes) -> tuple[bool, ...]:
    """How a reader may take a TIFF structure's header: (False,) classic, (True,)
    BigTIFF, () not a TIFF header. A big-endian BigTIFF header gives both: Pillow 13
    reads it as classic (it looks for 43 in the little-endian place only), libtiff and
    a fixed Pillow as BigTIFF, so both readings are checked."""
    magic = data[:4]
    if magic in (b"II*\x00", b"MM\x00*"):
        return (False,)
    if magic == b"II+\x00":
        return (True,)
    if magic == b"MM\x00+":
        return (False, True)
    return ()


def tiff_directory(data: bytes, big: bool) -> TiffDirectory | None:
    """The first IFD of a TIFF structure (a file, or an EXIF block without its prefix),
    classic or BigTIFF as `big` says, in the byte order of its header; None if it does
    not parse that way. Only the entry count is read when it is over MAX_TIFF_ENTRIES."""
    order = "little" if data[:2] == b"II" else "big"
    width = 8 if big else 4  # of counts, values and offsets
    entry_size = 4 + 2 * width
    offset = int.from_bytes(data[8:16] if big else data[4:8], order)
    count_size = 8 if big else 2
    if len(data) < 16 or offset + count_size > len(data):
        return None
    entries = int.from_bytes(data[offset : offset + count_size], order)
    if entries > MAX_TIFF_ENTRIES:
        return TiffDirectory(entries, 0, 0, True)
    value_bytes = pieces = 0
    uncompressed = True
    sizes = dict.fromkeys(_TIFF_SIZES.values(), 0)
    pos = offset + count_size
    for _ in range(entries):
        entry = data[pos : pos + entry_size]
        if len(entry) < entry_size:
            break
        pos += entry_size
        tag = int.from_bytes(entry[0:2], order)
        kind = int.from_bytes(entry[2:4], order)
        count = int.from_bytes(entry[4 : 4 + width], order)
        if tag in _TIFF_PIECE_TAGS:
            pieces = max(pieces, count)
        elif tag == _TIFF_COMPRESSION and kind in (3, 4) and count >= 1:
            value = entry[4 + width : 4 + width + _TIFF_VALUE_SIZES[kind]]
            uncompressed = int.from_bytes(value, order) == 1
        else:
            value_bytes += count * _TIFF_VALUE_SIZES.get(kind, 0)
            if tag in _TIFF_SIZES and kind in (3, 4) and count == 1:
                value = entry[4 + width : 4 + width + _TIFF_VALUE_SIZES[kind]]
                sizes[_TIFF_SIZES[tag]] = int.from_bytes(value, order)
    return TiffDirectory(
        entries,
        value_bytes,
        pieces,
        uncompressed,
        sizes["width"] * sizes["height"],
        sizes["tile_width"] * sizes["tile_height"],
    )


def _check_tiff(data: bytes, what: str) -> None:
    for big in tiff_layouts(data):
        found = tiff_directory(data, big)
        if found is not None:
            _check_tiff_directory(found, what)


def _check_tiff_directory(found: TiffDirectory, what: str) -> None:
    if found.entries > MAX_TIFF_ENTRIES:
        raise PayloadTooLarge(
            f"{what} has {found.entries} entries in its first directory, over the limit of "
            f"{MAX_TIFF_ENTRIES} (ordinary files have a few dozen); refused before decoding"
        )
    if found.value_bytes > MAX_TIFF_VALUE_BYTES:
        raise PayloadTooLarge(
            f"{what} has {found.value_bytes} bytes of numeric values in its first directory "
            f"(strip and tile tables aside), over the limit of {MAX_TIFF_VALUE_BYTES}; "
            "refused before decoding"
        )
    if found.tile_pixels > max(found.image_pixels, MAX_TIFF_TILE_PIXELS):
        raise PayloadTooLarge(
            f"{what} declares tiles of {found.tile_pixels} pixels, larger than its image and "
            f"than {MAX_TIFF_TILE_PIXELS} (libtiff makes a buffer of a whole tile); refused "
            "before decoding"
        )
    if found.uncompressed and found.pieces > MAX_TIFF_RAW_PIECES:
        raise PayloadTooLarge(
            f"uncompressed {what} in {found.pieces} strips or tiles, over the limit of "
            f"{MAX_TIFF_RAW_PIECES} (each is decoded on its own); refused before decoding"
        )


def check_exif(block: bytes) -> None:
    """PayloadTooLarge (413) for an EXIF block (with or without its "Exif" prefix) whose
    first IFD is past the TIFF limits of the module doc: Pillow reads it as it reads a
    TIFF's, in Python, and a PNG's or WebP's EXIF may be as long as the upload."""
    while block.startswith(EXIF_PREFIX):
        block = block[len(EXIF_PREFIX) :]
    _check_tiff(block, "EXIF")


def check_structure(data: bytes, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> None:
    """PayloadTooLarge (413) for a JPEG, PNG, GIF or TIFF past the limits of the module
    doc."""
    if data.startswith(JPEG_MAGIC):
        found = jpeg_structure(data, max_jpeg_scans)
        if found.scans > max_jpeg_scans:
            raise PayloadTooLarge(
                f"JPEG has more than {max_jpeg_scans} scans, the limit (--max-jpeg-scans): "
                "each scan is another decoding pass over the whole image, and encoders "
                "write 1 to about 10"
            )
        if found.segments > MAX_JPEG_SEGMENTS:
            raise PayloadTooLarge(
                f"JPEG has more than {MAX_JPEG_SEGMENTS} marker segments (ordinary files "
                "have a few dozen); refused before decoding"
            )
        if found.skipped > MAX_JPEG_SKIPPED_BYTES:
            raise PayloadTooLarge(
                f"JPEG has more than {MAX_JPEG_SKIPPED_BYTES} fill or stray bytes between "
                "its marker segments; refused before decoding"
            )
    elif data.startswith(PNG_MAGIC) and png_chunks(data) > MAX_PNG_CHUNKS:
        raise PayloadTooLarge(
            f"PNG has more than {MAX_PNG_CHUNKS} chunks (ordinary files keep their image "
            "data in chunks of 8 KiB or more); refused before decoding"
        )
    elif data.startswith(GIF_MAGICS):
        gif = gif_structure(data)
        if gif.blocks > MAX_GIF_BLOCKS:
            raise PayloadTooLarge(
                f"GIF has more than {MAX_GIF_BLOCKS} extension blocks before its first "
                "image (ordinary files have a few); refused before decoding"
            )
        if gif.skipped > MAX_GIF_SKIPPED_BYTES:
            raise PayloadTooLarge(
                f"GIF has more than {MAX_GIF_SKIPPED_BYTES} stray bytes before its first "
                "image; refused before decoding"
            )
    elif data.startswith(TIFF_MAGICS):
        _check_tiff(data, "TIFF")
