"""A generated corpus of hostile and odd inputs for the predict endpoints: no fixture files.

`corpus()` returns a few hundred `Case`s, each an httpx request (keyword arguments of `.post`) and its
documented outcome: the status (or, for corrupted bytes, the statuses) it may get, the problem type
of a 4xx, and the heatmap size of a success. Everything is made here from seeded random pixels, by
Pillow or by hand (for headers Pillow will not write), so the corpus is the same on every machine.

    python -m tests.badimages            # the outcome table of docs/reliability.md, by group

Groups: truncated, corrupted, wrong-magic, bomb, geometry, mode, multi-frame, exif, other-format,
multipart, content-type. The rules behind each expectation are in docs/reliability.md.
"""

from __future__ import annotations

import base64
import gzip
import io
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

OK = 200
INVALID = "invalid-image"
TOO_LARGE = "image-too-large"
QUERY = "?heatmap=png&regions=true"


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    request: dict[str, Any] = field(repr=False)  # httpx .post keywords: content/files/headers
    expect: tuple[int, ...]  # documented statuses; one unless the bytes are randomly corrupted
    slug: str | None = None  # the problem type (after urn:anoscope:problem:) of a single 4xx
    size: tuple[int, int] | None = None  # (width, height) of the heatmap on success
    files: int = 1  # results expected on success


# -- encoders -------------------------------------------------------------------------------------------


def _rgb(w: int = 24, h: int = 16, seed: int = 0) -> Image.Image:
    """The toy model's 'normal' texture with a bright defect, like tests/conftest.py's image factory."""
    arr = np.random.default_rng(seed).integers(40, 90, (h, w, 3), dtype=np.uint8)
    arr[h // 4 : h // 4 + max(1, h // 8), w // 2 : w // 2 + max(1, w // 8)] = 250
    return Image.fromarray(arr)


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, depth: int, color: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: any IHDR (Pillow will not write 16-bit colour or absurd sizes)."""
    idat = zlib.compress(rows if rows is not None else b"\0" * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png16(width: int, height: int, channels: int, value: int = 0x5A5A) -> bytes:
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    row = b"\0" + np.full((width, channels), value, ">u2").tobytes()
    return png_raw(width, height, 16, color, row * height)


def gif_declaring(width: int, height: int, frames: int = 1) -> bytes:
    """A GIF whose screen and frames declare width x height but hold one pixel of data each."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame * frames + b"\x3b"


def gif_tiny_frames(width: int, height: int, frames: int) -> bytes:
    """A large canvas with many 1x1 frames: costs nothing to hold, checks frame counting stays cheap."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x21\xf9\x04\x00\x00\x00\x00\x00\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame * frames + b"\x3b"


def bmp_declaring(width: int, height: int, bpp: int = 24) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16


def tiff_declaring(width: int, height: int) -> bytes:
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 4, height), (279, 4, 16)]  # fmt: skip
    ifd = b"".join(
        struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in tags
    )
    return b"II*\x00" + struct.pack("<I", 24) + b"\0" * 16 + struct.pack("<H", len(tags)) + ifd + b"\0\0\0\0"


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def with_exif(img: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    if fmt == "TIFF":
        return encode(img, fmt, tiffinfo={0x0112: orientation})
    return encode(img, fmt, exif=exif.tobytes())


# -- requests -------------------------------------------------------------------------------------------


def raw(data: bytes, content_type: str = "application/octet-stream", **headers: str) -> dict[str, Any]:
    return {"content": data, "headers": {"Content-Type": content_type, **headers}}


BOUNDARY = "corpus-7d1f"


def part(data: bytes, *, name: str | None = "files", filename: str | None = "img", ctype: str = "image/png") -> bytes:
    disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
    disposition += f'; filename="{filename}"' if filename is not None else ""
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n"
    return head.encode("utf-8") + data + b"\r\n"


def form(*parts: bytes, end: bool = True) -> dict[str, Any]:
    body = b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if end else b"")
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}}


# -- the groups -----------------------------------------------------------------------------------------

BASE = _rgb()
SIZE = BASE.size
FORMATS: dict[str, bytes] = {
    "png": encode(BASE, "PNG"),
    "jpeg": encode(BASE, "JPEG", quality=90),
    "bmp": encode(BASE, "BMP"),
    "tiff": encode(BASE, "TIFF"),
    "tiff-lzw": encode(BASE, "TIFF", compression="tiff_lzw"),
    "gif": encode(BASE.convert("P"), "GIF"),
    "webp": encode(BASE, "WEBP", lossless=True),
}
# Bytes at the end a decoder may not need (PNG: IEND, the IDAT CRC and the zlib checksum; GIF: the
# trailer): the failing cuts stop short of them, and the documented successes below cut inside them.
_OPTIONAL_TAIL = {"png": 30, "gif": 2}


def truncated() -> Iterator[Case]:
    for fmt, data in FORMATS.items():
        keep = len(data) - _OPTIONAL_TAIL.get(fmt, 0)
        step = max(1, keep // 14)
        for cut in [*range(0, keep, step), keep - 1]:
            slug = INVALID
            yield Case(f"{fmt} cut at {cut} of {len(data)} bytes", "truncated", raw(data[:cut]), (422,), slug)
    png, gif = FORMATS["png"], FORMATS["gif"]
    yield Case("png without its IEND chunk", "truncated", raw(png[:-12]), (OK,), size=SIZE)
    yield Case("png without IEND and its IDAT CRC", "truncated", raw(png[:-16]), (OK,), size=SIZE)
    yield Case("gif without its trailer", "truncated", raw(gif[:-1]), (OK,), size=SIZE)
    yield Case("png body of 1 byte", "truncated", raw(png[:1], "image/png"), (422,), INVALID)


def corrupted() -> Iterator[Case]:
    rng = np.random.default_rng(8)
    for fmt, data in FORMATS.items():
        for pos in range(0, len(data), max(1, len(data) // 12)):
            bad = bytearray(data)
            bad[pos] ^= 0xFF
            # A decoder notices damage to structure (422); damage inside pixel data of formats without a
            # checksum decodes to other pixels (200); a damaged size field may declare too many pixels (413).
            yield Case(f"{fmt} byte {pos} inverted", "corrupted", raw(bytes(bad)), (422, OK, 413))
        bad = bytearray(data)
        start = len(data) // 3
        bad[start : start + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        yield Case(f"{fmt} 16 random bytes at {start}", "corrupted", raw(bytes(bad)), (422, OK, 413))
        tail = bytearray(data)
        tail[-len(data) // 4 :] = b"\0" * (len(data) // 4)
        yield Case(f"{fmt} last quarter zeroed", "corrupted", raw(bytes(tail)), (422, OK, 413))
    png = FORMATS["png"]
    idat = png.find(b"IDAT")
    bad_crc = png[: idat + 4] + bytes([png[idat + 4] ^ 1]) + png[idat + 5 :]
    yield Case("png IDAT data changed (zlib/CRC mismatch)", "corrupted", raw(bad_crc), (422,), INVALID)


def wrong_magic() -> Iterator[Case]:
    png, jpeg = FORMATS["png"], FORMATS["jpeg"]
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    cases = {
        "png with its first byte zeroed": b"\0" + png[1:],
        "png signature without its CRLF": png[:4] + png[6:],
        "png signature, jpeg body": png[:8] + jpeg[2:],
        "jpeg SOI, png body": b"\xff\xd8" + png[8:],
        "jpeg with SOI swapped": b"\xd8\xff" + jpeg[2:],
        "GIF89a then noise": b"GIF89a" + noise,
        "BM then noise": b"BM" + noise[:60],
        "II*\\0 then noise": b"II*\x00" + noise,
        "MM\\0* then noise": b"MM\x00*" + noise,
        "RIFF WEBP then noise": b"RIFF" + struct.pack("<I", 1000) + b"WEBP" + noise[:64],
        "P6 header without pixels": b"P6\n24 16\n255\n",
        "pure noise": noise,
        "zeros": b"\0" * 4096,
        "0xff bytes": b"\xff" * 4096,
        "text": b"not an image, just a note from the camera",
        "json": b'{"image": "iVBORw0KGgo..."}',
        "html error page": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        "pdf": b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF",
        "zip": b"PK\x03\x04" + noise[:100],
        "gzip of a png": gzip.compress(png),
        "elf binary": b"\x7fELF\x02\x01\x01" + noise[:200],
        "base64 of a png": base64.b64encode(png),
        "data URL of a png": b"data:image/png;base64," + base64.b64encode(png),
        "png twice, truncated halves": png[: len(png) // 2] + png[: len(png) // 2],
        "utf-16 text": "\ufeffnot an image".encode("utf-16"),
    }
    for name, data in cases.items():
        yield Case(name, "wrong-magic", raw(data), (422,), INVALID)
    yield Case("png with 1 MB of trailing junk", "wrong-magic", raw(png + noise * 500), (OK,), size=SIZE)


def bombs() -> Iterator[Case]:
    huge = {
        "png declaring 100000x100000": png_raw(100_000, 100_000, 8, 2),
        "png declaring 2^31-1 squared": png_raw(2**31 - 1, 2**31 - 1, 8, 2),
        "png declaring 4294967295x1": png_raw(2**32 - 1, 1, 8, 0),
        "png declaring 1x40000001 (one over)": png_raw(1, 40_000_001, 8, 0),
        "png declaring 6325x6325 (just over)": png_raw(6325, 6325, 8, 2),
        "16-bit png declaring 7000x7000": png_raw(7000, 7000, 16, 2),
        "gif declaring 65535x65535": gif_declaring(65535, 65535),
        "bmp declaring 100000x100000": bmp_declaring(100_000, 100_000),
        "bmp declaring negative (top-down) height": bmp_declaring(100_000, -100_000),
        "bmp declaring height -2^31": bmp_declaring(1, -(2**31)),
        "tiff declaring 100000x100000": tiff_declaring(100_000, 100_000),
        "tiff declaring 2^32-1 squared": tiff_declaring(2**32 - 1, 2**32 - 1),
        "jpeg declaring 65500x65500": jpeg_declaring(65500, 65500),
        "jpeg declaring 7000x7000": jpeg_declaring(7000, 7000),
        "ppm declaring 100000x100000": b"P6 100000 100000 255\n" + b"\0" * 30,
        "real zlib bomb: 8000x6000 png of zeros (46 kB)": encode(Image.new("L", (8000, 6000)), "PNG"),
        "real bomb: 9000x9000 1-bit group4 tiff": encode(Image.new("1", (9000, 9000)), "TIFF", compression="group4"),
    }
    for name, data in huge.items():
        yield Case(name, "bomb", raw(data), (413,), TOO_LARGE)
    empty = {
        "png declaring 0x10": png_raw(0, 10, 8, 2),
        "gif declaring 0x0": gif_declaring(0, 0),
        "bmp declaring 0x5": bmp_declaring(0, 5),
        "tiff declaring 0x10": tiff_declaring(0, 10),
        "jpeg declaring height 0": jpeg_declaring(64, 0),
        "ppm declaring -5x5": b"P6 -5 5 255\n" + b"\0" * 30,
        "ppm with a 20-digit width": b"P6 99999999999999999999 5 255\n" + b"\0" * 30,
        "pgm with maxval 0": b"P5 4 4 0\n" + b"\0" * 16,
        "gif 6000x6000 holding one pixel of data": gif_declaring(6000, 6000),
    }
    for name, data in empty.items():
        yield Case(name, "bomb", raw(data), (422,), INVALID)
    yield Case(
        "gif 4000x4000 with 3000 one-pixel frames", "bomb", raw(gif_tiny_frames(4000, 4000, 3000)), (OK,),
        size=(4000, 4000),
    )  # fmt: skip


def geometry() -> Iterator[Case]:
    one = Image.new("RGB", (1, 1), (200, 200, 200))
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM"):
        yield Case(f"1x1 {fmt.lower()}", "geometry", raw(encode(one, fmt)), (OK,), size=(1, 1))
    for w, h, fmt in ((1, 20000, "PNG"), (20000, 1, "PNG"), (2, 19999, "JPEG"), (19999, 2, "TIFF"),
                      (65000, 2, "BMP"), (3, 16383, "WEBP"), (6000, 6000, "PNG")):  # fmt: skip
        img = Image.new("L", (w, h), 60)
        yield Case(f"{w}x{h} {fmt.lower()}", "geometry", raw(encode(img, fmt)), (OK,), size=(w, h))


def modes() -> Iterator[Case]:
    grey = BASE.convert("L")
    made = {
        "16-bit grey png (I;16)": encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG"),
        "16-bit grey tiff": encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "TIFF"),
        "16-bit rgb png": png16(24, 16, 3),
        "16-bit rgba png": png16(24, 16, 4),
        "16-bit grey+alpha png": png16(24, 16, 2),
        "16-bit pgm (maxval 65535)": b"P5 24 16 65535\n" + np.full((16, 24), 40000, ">u2").tobytes(),
        "32-bit int tiff (I)": encode(Image.fromarray(np.full((16, 24), 70000, np.int32)), "TIFF"),
        "float tiff (F) in 0-1": encode(Image.fromarray(np.full((16, 24), 0.5, np.float32)), "TIFF"),
        "float tiff (F) in 0-1e6": encode(Image.fromarray(np.full((16, 24), 1e6, np.float32)), "TIFF"),
        "float tiff (F) all NaN": encode(Image.fromarray(np.full((16, 24), np.nan, np.float32)), "TIFF"),
        "float tiff (F) with infinities": encode(
            Image.fromarray(np.where(np.eye(16, 24) > 0, np.inf, -np.inf).astype(np.float32)), "TIFF"
        ),
        "cmyk jpeg": encode(BASE.convert("CMYK"), "JPEG"),
        "cmyk tiff": encode(BASE.convert("CMYK"), "TIFF"),
        "lab tiff": encode(BASE.convert("LAB"), "TIFF"),
        "ycbcr jpeg-in-tiff": encode(BASE, "TIFF", compression="jpeg"),
        "grey jpeg": encode(grey, "JPEG"),
        "progressive jpeg": encode(BASE, "JPEG", progressive=True),
        "palette png": encode(BASE.convert("P"), "PNG"),
        "palette png with transparency": encode(BASE.convert("P"), "PNG", transparency=0),
        "palette gif with transparency": encode(BASE.convert("P"), "GIF", transparency=0),
        "palette bmp": encode(BASE.convert("P"), "BMP"),
        "rgba png, alpha 0": encode(BASE.convert("RGBA").copy(), "PNG"),
        "rgba webp": encode(BASE.convert("RGBA"), "WEBP"),
        "rgba bmp": encode(BASE.convert("RGBA"), "BMP"),
        "grey+alpha png": encode(BASE.convert("LA"), "PNG"),
        "1-bit png": encode(BASE.convert("1"), "PNG"),
        "1-bit bmp": encode(BASE.convert("1"), "BMP"),
        "1-bit pbm": encode(BASE.convert("1"), "PPM"),
        "2-bit grey png": png_raw(24, 16, 2, 0, (b"\0" + b"\xa5" * 6) * 16),
        "pgm": encode(grey, "PPM"),
        "lossy webp": encode(BASE, "WEBP", quality=50),
        "tiled lzw tiff": encode(BASE, "TIFF", compression="tiff_lzw", tile=(16, 16)),
    }
    transparent = BASE.convert("RGBA")
    transparent.putalpha(0)
    made["rgba png, fully transparent"] = encode(transparent, "PNG")
    for name, data in made.items():
        yield Case(name, "mode", raw(data), (OK,), size=SIZE)


def multi_frame() -> Iterator[Case]:
    other = [_rgb(40, 30, seed=1), _rgb(40, 30, seed=2).convert("L")]
    made = {
        "animated gif (first frame)": encode(
            BASE.convert("P"), "GIF", save_all=True, append_images=[o.convert("P") for o in other], duration=20, loop=0
        ),
        "apng (first frame)": encode(
            BASE, "PNG", save_all=True, append_images=[o.convert("RGB").resize(SIZE) for o in other]
        ),
        "multi-page tiff (first page)": encode(BASE, "TIFF", save_all=True, append_images=other),
        "animated webp (first frame)": encode(
            BASE, "WEBP", save_all=True, append_images=[o.convert("RGB").resize(SIZE) for o in other], duration=20
        ),
        "multi-page tiff, later page a bomb": encode(
            BASE, "TIFF", save_all=True, append_images=[Image.new("1", (9000, 9000))], compression="tiff_lzw"
        ),
    }
    for name, data in made.items():
        yield Case(name, "multi-frame", raw(data), (OK,), size=SIZE)


def exif() -> Iterator[Case]:
    w, h = SIZE
    for orientation in range(1, 9):
        size = (h, w) if orientation >= 5 else (w, h)
        data = with_exif(BASE, "JPEG", orientation)
        yield Case(f"jpeg EXIF orientation {orientation}", "exif", raw(data), (OK,), size=size)
    for fmt in ("PNG", "TIFF", "WEBP"):
        yield Case(f"{fmt.lower()} EXIF orientation 6", "exif", raw(with_exif(BASE, fmt, 6)), (OK,), size=(h, w))
    for orientation in (0, 9, 99, 65535):
        data = with_exif(BASE, "JPEG", orientation)
        yield Case(f"jpeg EXIF orientation {orientation} (invalid: ignored)", "exif", raw(data), (OK,), size=SIZE)
    junk = {
        "jpeg with a garbage EXIF block": b"Exif\0\0" + b"\xff" * 40,
        "jpeg with an EXIF IFD pointing past its end": b"Exif\0\0MM\0*\0\0\0\x08\xff\xff" + b"\x01" * 30,
        "jpeg with an empty EXIF block": b"Exif\0\0",
    }
    for name, block in junk.items():
        yield Case(name, "exif", raw(encode(BASE, "JPEG", exif=block)), (OK,), size=SIZE)


def other_formats() -> Iterator[Case]:
    """Formats Pillow reads but anoscope does not open (service.images.FORMATS)."""
    made = {
        "tga": encode(BASE, "TGA"),
        "ico": encode(BASE, "ICO"),
        "pcx": encode(BASE, "PCX"),
        "sgi": encode(BASE, "SGI"),
        "qoi": encode(BASE, "QOI"),
        "dds": encode(BASE.convert("RGBA"), "DDS"),
        "jpeg 2000": encode(BASE, "JPEG2000"),
        "spider": encode(BASE.convert("F"), "SPIDER"),
        "xbm": encode(BASE.convert("1"), "XBM"),
        "msp": encode(BASE.convert("1"), "MSP"),
        "eps (would run Ghostscript)": encode(BASE, "EPS"),
        "icns": encode(BASE.resize((16, 16)), "ICNS"),
        "blp": encode(BASE.convert("P"), "BLP"),
    }
    for name, data in made.items():
        yield Case(name, "other-format", raw(data), (422,), INVALID)


def multipart() -> Iterator[Case]:
    png = FORMATS["png"]
    yield Case("one empty part", "multipart", form(part(b"")), (422,), INVALID)
    yield Case("an empty part after a good one", "multipart", form(part(png), part(b"", filename="e")), (422,), INVALID)
    yield Case("a part with an empty filename", "multipart", form(part(png, filename="")), (OK,), size=SIZE)
    yield Case("a part without a filename", "multipart", form(part(png, filename=None)), (OK,), size=SIZE)
    yield Case("a part named with a client path", "multipart", form(part(png, filename="C:\\cam\\..\\..\\x.png")),
               (OK,), size=SIZE)  # fmt: skip
    yield Case("a part with a 1000-character filename", "multipart", form(part(png, filename="f" * 1000)), (OK,),
               size=SIZE)  # fmt: skip
    yield Case("a part with control characters in its filename", "multipart",
               form(part(png, filename="a\x01b\x7fc.png")), (OK,), size=SIZE)  # fmt: skip
    yield Case("a png part labelled text/plain", "multipart", form(part(png, ctype="text/plain")), (OK,), size=SIZE)
    yield Case("a part without a Content-Disposition name", "multipart", form(part(png, name=None)), (400,), "input")
    yield Case("a part in another field", "multipart", form(part(png, name="image")), (400,), "input")
    yield Case("only a text field", "multipart", form(part(b"hello", name="note", filename=None)), (400,), "input")
    yield Case("no parts at all", "multipart", form(), (400,), "input")
    yield Case("an empty body", "multipart", form(end=False), (400,), "input")
    yield Case("no closing boundary", "multipart", form(part(png), end=False), (400,), "input")
    yield Case("17 empty parts (over max_files)", "multipart", form(*[part(b"")] * 17), (413,), "too-many-files")
    wrong = form(part(png))
    wrong["headers"] = {"Content-Type": "multipart/form-data; boundary=not-the-boundary"}
    yield Case("a boundary the body does not use", "multipart", wrong, (400,), "input")
    bare = {"content": png, "headers": {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}}
    yield Case("multipart header, raw png body", "multipart", bare, (400,), "input")
    headerless = form(f"--{BOUNDARY}\r\n\r\n".encode() + png + b"\r\n")
    yield Case("a part without headers", "multipart", headerless, (400,), "input")
    nested = form(part(form(part(png))["content"], ctype=f"multipart/mixed; boundary={BOUNDARY}x"))
    yield Case("a multipart body inside a part", "multipart", nested, (422,), INVALID)
    epilogue = form(part(png))
    epilogue["content"] += b"epilogue text"
    yield Case("an epilogue after the closing boundary", "multipart", epilogue, (OK,), size=SIZE)
    preamble = form(part(png))
    preamble["content"] = b"preamble text\r\n" + preamble["content"]  # legal MIME, but no HTTP client sends one
    yield Case("a preamble before the first boundary", "multipart", preamble, (400,), "input")
    four = form(*[part(FORMATS[f], filename=f) for f in ("png", "jpeg", "bmp", "tiff")])
    yield Case("four formats in one request", "multipart", four, (OK,), size=SIZE, files=4)


def content_types() -> Iterator[Case]:
    png = FORMATS["png"]
    accepted = ("image/png", "image/jpeg", "image/x-anything", "IMAGE/PNG", "image/png; charset=utf-8",
                "application/octet-stream", "image/")  # fmt: skip
    for ctype in accepted:
        yield Case(f"png as {ctype!r}", "content-type", raw(png, ctype), (OK,), size=SIZE)
    refused = ("text/plain", "application/json", "application/x-www-form-urlencoded", "multipart/mixed; boundary=x",
               "application/pdf", "video/mp4", "imagepng", "", "*/*")  # fmt: skip
    for ctype in refused:
        yield Case(f"png as {ctype!r}", "content-type", raw(png, ctype), (415,), "unsupported-media-type")
    yield Case("svg as image/svg+xml", "content-type",
               raw(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"), (422,), INVALID)  # fmt: skip
    yield Case("multipart without a boundary", "content-type", raw(png, "multipart/form-data"), (400,), "input")
    yield Case("png with a Content-Disposition path", "content-type",
               raw(png, "image/png", **{"Content-Disposition": 'inline; filename="../../etc/passwd"'}), (OK,),
               size=SIZE)  # fmt: skip
    yield Case("empty raw body", "content-type", raw(b"", "image/png"), (422,), INVALID)


GROUPS = (truncated, corrupted, wrong_magic, bombs, geometry, modes, multi_frame, exif, other_formats, multipart,
          content_types)  # fmt: skip


def corpus() -> list[Case]:
    """Every case, in a fixed order."""
    return [case for group in GROUPS for case in group()]


def table(cases: list[Case]) -> str:
    """The corpus summarised by group and expected outcome (the table in docs/reliability.md)."""
    counts = Counter((c.group, "/".join(map(str, c.expect)) + (f" {c.slug}" if c.slug else "")) for c in cases)
    lines = ["| group | expected | cases |", "|---|---|---:|"]
    lines += [f"| {group} | {outcome} | {n} |" for (group, outcome), n in counts.items()]
    lines.append(f"| **all** | | **{len(cases)}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(corpus()))
