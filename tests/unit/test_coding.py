"""gzip content coding: when a client accepts it, and that the streams are gzip."""

from __future__ import annotations

import gzip
import os

import pytest
from starlette.datastructures import Headers

from viewer_api import coding


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip, deflate, br, zstd", True),  # Chromium
        ("gzip, deflate", True),  # requests, httpx
        ("GZIP", True),
        ("x-gzip", True),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        ("*", True),
        ("*;q=0.5, gzip;q=0", False),  # refused by name beats the wildcard
        ("gzip;q=0", False),
        ("gzip;q=0.000", False),
        ("gzip;q=nonsense", False),
        ("identity", False),
        ("deflate, br", False),
        ("*;q=0", False),
        ("", False),
        (None, False),
    ],
)
def test_accepts_gzip(header: str | None, accepted: bool) -> None:
    assert coding.accepts_gzip(header) is accepted


def test_a_range_request_is_never_gzipped() -> None:
    assert coding.wants_gzip(Headers({"accept-encoding": "gzip"}))
    assert not coding.wants_gzip(Headers({"accept-encoding": "gzip", "range": "bytes=0-1"}))


def test_encode_round_trips_and_skips_small_bodies() -> None:
    body = b"DICM" + bytes(range(256)) * 64
    headers: dict[str, str] = {}
    packed = coding.encode(body, headers, True)
    assert headers == {"Content-Encoding": "gzip"}
    assert gzip.decompress(packed) == body and len(packed) < len(body)
    small: dict[str, str] = {}
    assert coding.encode(b"[]", small, True) == b"[]" and small == {}
    untouched: dict[str, str] = {}
    assert coding.encode(body, untouched, False) is body and untouched == {}


def test_stream_is_one_gzip_member_of_every_chunk() -> None:
    chunks = [os.urandom(10_000), b"", b"\0" * 100_000, b"tail"]
    assert gzip.decompress(b"".join(coding.gzip_stream(iter(chunks)))) == b"".join(chunks)
    assert gzip.decompress(b"".join(coding.gzip_stream(iter([])))) == b""


def test_vary_adds_accept_encoding_once() -> None:
    assert coding.vary({"Vary": "Accept"})["Vary"] == "Accept, Accept-Encoding"
    assert coding.vary({})["Vary"] == "Accept-Encoding"
    once = coding.vary({"Vary": "Accept, accept-encoding"})
    assert once["Vary"] == "Accept, accept-encoding"
