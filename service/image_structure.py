"""An upload's structure, checked before any decoder sees it.

`--max-pixels` bounds the image a decoder makes, not the work of getting there, and two
kinds of file cost far more per byte than their pixels do:

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.errors import PayloadTooLarge

DEFAULT_MAX_JPEG_SCANS = 500
MAX_JPEG_SEGMENTS = 4000
MAX_JPEG_SKIPPED_BYTES = 64 * 1024
MAX_PNG_CHUNKS = 50_000

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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


def check_structure(data: bytes, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> None:
    """PayloadTooLarge (413) for a JPEG or PNG past the limits of the module doc."""
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
