"""Images as the client sends them: encoded bytes, and multipart fields of them."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


def encode(array: np.ndarray | Image.Image, fmt: str = "PNG", **options) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upload(*images: bytes, content_type: str = "image/png") -> list[tuple[str, tuple]]:
    """Multipart `file` fields, one per image, in order."""
    return [("file", (f"image{i}.png", data, content_type)) for i, data in enumerate(images)]


def phone_photo(photo: np.ndarray, width: int = 4032, height: int = 3024, **options) -> bytes:
    """A photograph at a phone camera's size (Lanczos upscale), with sensor-like Gaussian
    grain of sigma 6 (the detail that a reduced decode filters differently), as a
    quality-90 JPEG; `options` go to PIL's JPEG encoder (exif=...)."""
    large = np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.LANCZOS))
    grain = np.random.default_rng(0).normal(0, 6, large.shape)
    pixels = np.clip(large + grain, 0, 255).astype(np.uint8)
    return encode(pixels, "JPEG", quality=90, **options)


def photo_36mpx() -> bytes:
    """A 6000x6000 JPEG with shapes on a gradient (about 2 MB, under the upload limit)."""
    ramp = np.linspace(40, 215, 6000, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp, (6000, 1))] * 3, axis=-1))
    draw = ImageDraw.Draw(image)
    draw.ellipse((500, 600, 2500, 2600), fill=(220, 40, 40))
    draw.rectangle((3200, 3000, 5200, 5000), fill=(40, 200, 60))
    draw.polygon([(1000, 5600), (2200, 3400), (3400, 5600)], fill=(30, 60, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def many_scan_jpeg(width: int, height: int, extra_scans: int) -> tuple[bytes, bytes]:
    """A flat progressive JPEG, and the same with its smallest AC scan repeated
    `extra_scans` more times before the end: a few bytes per scan, each one another
    decoding pass over the whole image (libjpeg warns and goes on). Built by walking the
    stream's marker segments (ISO 10918-1 B.1), independently of service.image_structure."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 130, 140)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    segments, pos = [], 2
    while data[pos + 1] != 0xD9:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if data[pos + 1] == 0xDA:  # entropy-coded data up to the next real marker
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 2)
        segments.append(data[pos:end])
        pos = end
    scans = [s for s in segments if s[1] == 0xDA]
    ac_scans = [s for s in scans if s[5 + 2 * s[4]] >= 1]  # spectral start Ss > 0
    assert len(scans) == 10, len(scans)
    repeated = min(ac_scans, key=len)
    return data, data[:pos] + repeated * extra_scans + data[pos:]


def after_soi(jpeg: bytes, inserted: bytes) -> bytes:
    """`inserted` between a JPEG's start-of-image marker and its first segment."""
    return jpeg[:2] + inserted + jpeg[2:]


def png_chunk(kind: bytes, payload: bytes = b"") -> bytes:
    """One PNG chunk: length, type, data, CRC of type and data."""
    crc = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + crc


def png_with_chunks(extra_chunks: int, kind: bytes) -> bytes:
    """A flat 64x48 PNG with `extra_chunks` empty chunks of `kind` after its header."""
    data = encode(np.full((48, 64, 3), 90, np.uint8), "PNG")
    header_end = 8 + 25  # the signature and IHDR
    return data[:header_end] + png_chunk(kind) * extra_chunks + data[header_end:]


def tiff_file(
    grey: np.ndarray,
    *,
    rows_per_strip: int | None = None,
    tile: tuple[int, int] | None = None,
    big: bool = False,
    order: str = "<",
    deflate: bool = False,
    extra_entries: tuple[tuple[int, int, int, bytes], ...] = (),
) -> bytes:
    """An 8-bit greyscale TIFF of `grey`, written from the TIFF 6.0 spec (and the BigTIFF
    extension) independently of Pillow's writer: in strips of `rows_per_strip` rows
    (default: one strip) or in `tile` (width, height) tiles, classic or BigTIFF, little
    ("<") or big (">") endian, uncompressed or each piece zlib-compressed (`deflate`,
    Compression 8). `extra_entries` are more IFD entries, (tag, type, count, value bytes
    in the file's byte order)."""
    height, width = grey.shape
    if tile is None:
        rows = rows_per_strip or height
        pieces = [grey[top : top + rows].tobytes() for top in range(0, height, rows)]
    else:
        tile_width, tile_height = tile
        padded = np.zeros(
            (-(-height // tile_height) * tile_height, -(-width // tile_width) * tile_width),
            np.uint8,
        )
        padded[:height, :width] = grey
        pieces = [
            padded[top : top + tile_height, left : left + tile_width].tobytes()
            for top in range(0, padded.shape[0], tile_height)
            for left in range(0, padded.shape[1], tile_width)
        ]
    if deflate:
        pieces = [zlib.compress(piece) for piece in pieces]
    word, long_type = ("Q", 16) if big else ("I", 4)  # counts, values and offsets

    def number(kind: str, *values: int) -> bytes:
        return struct.pack(f"{order}{len(values)}{kind}", *values)

    header_size = 16 if big else 8
    offsets = list(itertools.accumulate(map(len, pieces[:-1]), initial=header_size))
    entries = [
        (256, 4, 1, number("I", width)),
        (257, 4, 1, number("I", height)),
        (258, 3, 1, number("H", 8)),
        (259, 3, 1, number("H", 8 if deflate else 1)),
        (262, 3, 1, number("H", 1)),  # black is zero
        (277, 3, 1, number("H", 1)),
        *extra_entries,
    ]
    if tile is None:
        entries += [
            (273, long_type, len(pieces), number(word, *offsets)),
            (278, 4, 1, number("I", rows_per_strip or height)),
            (279, long_type, len(pieces), number(word, *map(len, pieces))),
        ]
    else:
        entries += [
            (322, 4, 1, number("I", tile[0])),
            (323, 4, 1, number("I", tile[1])),
            (324, long_type, len(pieces), number(word, *offsets)),
            (325, long_type, len(pieces), number(word, *map(len, pieces))),
        ]
    return tiff_structure(b"".join(pieces), sorted(entries), big, order)


def tiff_structure(
    data: bytes, entries: list[tuple[int, int, int, bytes]], big: bool, order: str
) -> bytes:
    """A TIFF header, `data`, the values too long for their entries, then the one IFD."""
    word, inline, header_size = ("Q", 8, 16) if big else ("I", 4, 8)
    position = header_size + len(data)
    stored, values = [], b""
    for tag, kind, count, value in entries:
        if len(value) <= inline:
            field = value.ljust(inline, b"\0")
        else:
            field = struct.pack(f"{order}{word}", position + len(values))
            values += value
        stored.append(struct.pack(f"{order}HH{word}", tag, kind, count) + field)
    directory_offset = position + len(values)
    mark = b"II" if order == "<" else b"MM"
    if big:
        head = mark + struct.pack(f"{order}HHHQ", 43, 8, 0, directory_offset)
    else:
        head = mark + struct.pack(f"{order}HI", 42, directory_offset)
    count = struct.pack(f"{order}{word if big else 'H'}", len(entries))
    return head + data + values + count + b"".join(stored) + bytes(inline)


def exif_block(entries: list[tuple[int, int, int, bytes]], big: bool = False) -> bytes:
    """A little-endian EXIF block (a TIFF header and one IFD, without the "Exif" prefix)
    of (tag, type, count, value bytes) entries."""
    return tiff_structure(b"", sorted(entries), big, "<")


def gif_with(before_image: bytes, array: np.ndarray | None = None) -> bytes:
    """A GIF (Pillow's, of `array` or a flat 64x48 picture) with `before_image` inserted
    after its header and global colour table, before its first block (GIF89a spec)."""
    picture = array if array is not None else np.full((48, 64, 3), 90, np.uint8)
    data = encode(picture, "GIF")
    flags = data[10]
    start = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    return data[:start] + before_image + data[start:]


def gif_comment(sub_blocks: list[bytes]) -> bytes:
    """A comment extension (0x21 0xFE) of these data sub-blocks and its terminator."""
    return b"\x21\xfe" + b"".join(bytes([len(b)]) + b for b in sub_blocks) + b"\x00"
