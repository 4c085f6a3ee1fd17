"""Reading images out of a request body, with the size and count limits enforced while streaming.

Two body forms are accepted:
* `multipart/form-data`, one or more parts in the field `files`;
* a single raw image: `Content-Type: image/*` (or `application/octet-stream`), with an optional
  `Content-Disposition: inline; filename="cam1.png"` naming it.

A declared `Content-Length` over the limit is refused before one byte is read; otherwise the bytes are
counted as they arrive (chunked uploads included) and the request is refused as soon as the count
passes the limit. Parts are parsed as they stream in and held in memory (bounded by the body limit),
so nothing is spooled to disk.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import InputError, PayloadTooLargeError, TooManyFilesError, UnsupportedMediaTypeError

FIELD = "files"
RAW_TYPES = ("application/octet-stream",)


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


def _too_large(limit: int, what: str) -> PayloadTooLargeError:
    msg = (
        f"{what}; the limit is {limit} bytes ({limit / 1e6:g} MB). Send fewer or smaller images per request "
        "(operators: ANOSCOPE_MAX_BODY_BYTES)"
    )
    return PayloadTooLargeError(msg)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _too_large(limit, f"the request body declares {int(declared)} bytes")
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit, f"the request body passed {limit} bytes before it ended")
        if chunk:
            yield chunk


def _filename(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    # Some clients send a full client-side path; keep the base name, bounded and printable.
    text = os.path.basename(text.replace("\\", "/"))
    text = "".join(c for c in text if c.isprintable())[:255]
    return text or None


class _MultipartCollector:
    """python-multipart callbacks that keep the `files` parts in memory and count them."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._chunks: list[bytes] = []
        self._filename: str | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._chunks = []
        self._filename = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            msg = "a multipart part has no Content-Disposition name; send images in the form field 'files'"
            raise InputError(msg)
        if name != FIELD.encode():
            shown = name.decode("utf-8", errors="replace")[:64]
            msg = f"multipart field {shown!r} is not accepted; send each image in a field named 'files'"
            raise InputError(msg)
        if len(self.uploads) >= self.max_files:
            msg = (
                f"the request holds more than {self.max_files} files; send at most {self.max_files} images per "
                "request (operators: ANOSCOPE_MAX_FILES)"
            )
            raise TooManyFilesError(msg)
        self._filename = _filename(options.get(b"filename"))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        self.uploads.append(Upload(self._filename, b"".join(self._chunks)))
        self._chunks = []

    def on_end(self) -> None:
        self.ended = True


async def _read_multipart(request: Request, boundary: bytes, *, max_body_bytes: int, max_files: int) -> list[Upload]:
    collector = _MultipartCollector(max_files)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in _limited(request, max_body_bytes):
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        msg = f"the multipart body could not be parsed ({exc}); send a standard multipart/form-data upload"
        raise InputError(msg) from exc
    if not collector.ended:
        msg = "the multipart body ended before its closing boundary; the upload is truncated or malformed"
        raise InputError(msg)
    if not collector.uploads:
        msg = "the multipart body holds no files; send one or more images in the form field 'files'"
        raise InputError(msg)
    return collector.uploads


async def read_uploads(request: Request, *, max_body_bytes: int, max_files: int) -> list[Upload]:
    """The images in the request body, or a domain error saying what is wrong with the body."""
    content_type = request.headers.get("content-type", "")
    media, params = parse_options_header(content_type)
    media_type = media.decode("latin-1").strip().lower()
    if media_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            msg = "the multipart Content-Type has no boundary parameter; let your HTTP client build the form"
            raise InputError(msg)
        return await _read_multipart(request, boundary, max_body_bytes=max_body_bytes, max_files=max_files)
    if media_type.startswith("image/") or media_type in RAW_TYPES:
        chunks = [chunk async for chunk in _limited(request, max_body_bytes)]
        _, disposition = parse_options_header(request.headers.get("content-disposition", ""))
        return [Upload(_filename(disposition.get(b"filename")), b"".join(chunks))]
    shown = media_type or "none"
    msg = (
        f"Content-Type {shown!r} is not accepted; send multipart/form-data with images in the field 'files', "
        "or one image as the raw body with an image/* Content-Type"
    )
    raise UnsupportedMediaTypeError(msg)
