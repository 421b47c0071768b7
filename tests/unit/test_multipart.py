"""The WADO-RS wire format (viewer_api.dicomweb.multipart): the multipart writer byte by byte,
Accept parsing as OHIF, Weasis and dicomweb-client spell it, and the negotiation rules."""

from __future__ import annotations

import email.parser
import email.policy

import pytest

from viewer_api.dicomweb import multipart as mp

JLS = "1.2.840.10008.1.2.4.80"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
EXPLICIT = mp.EXPLICIT_VR_LE
IMPLICIT = mp.IMPLICIT_VR_LE


# ---------------------------------------------------------------------------- writer


def _body(boundary: str, parts: list[tuple[str, bytes]]) -> bytes:
    return b"".join(bytes(piece) for piece in mp.write_multipart(boundary, parts))


def test_writer_layout_is_what_cornerstone_parses() -> None:
    b = "telerad-abc"
    body = _body(b, [("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", b"AB"),
                     ("image/jls; transfer-syntax=" + JLS, b"\xff\xd8--x\r\n")])  # fmt: skip
    assert body == (
        b"--telerad-abc\r\n"
        b"Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\r\n"
        b"\r\n"
        b"AB"
        b"\r\n--telerad-abc\r\n"
        b"Content-Type: image/jls; transfer-syntax=1.2.840.10008.1.2.4.80\r\n"
        b"\r\n"
        b"\xff\xd8--x\r\n"
        b"\r\n--telerad-abc--\r\n"
    )
    # Cornerstone: the boundary is the first line, the part ends 2 bytes before the next one.
    first_line = body.split(b"\r\n", 1)[0]
    assert first_line == b"--" + b.encode()
    start = body.index(b"\r\n\r\n") + 4
    end = body.index(first_line, start)
    assert body[start : end - 2] == b"AB"


def test_writer_round_trips_through_a_mime_parser() -> None:
    b = mp.boundary_for('"etag-1"')
    parts = [(mp.content_type("application/dicom", EXPLICIT), bytes(range(256)) * 3),
             (mp.content_type("application/dicom", JLS), b"")]  # fmt: skip
    body = _body(b, parts)
    head = f"Content-Type: {mp.multipart_content_type('application/dicom', b)}\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head.encode() + body)
    got = [
        (p.get_content_type(), p.get_param("transfer-syntax"), p.get_payload(decode=True))
        for p in message.iter_parts()
    ]
    assert got == [("application/dicom", EXPLICIT, parts[0][1]), ("application/dicom", JLS, b"")]


def test_no_parts_is_just_the_close_delimiter() -> None:
    assert _body("b", []) == b"--b--\r\n"
    assert mp.multipart_length("b", []) == len(b"--b--\r\n")


def test_length_is_exact() -> None:
    parts = [("application/dicom; transfer-syntax=" + EXPLICIT, b"x" * 1000),
             ("application/dicom; transfer-syntax=" + JLS, b"y" * 7)]  # fmt: skip
    assert mp.multipart_length("bnd", [(ct, len(d)) for ct, d in parts]) == len(_body("bnd", parts))


def test_boundary_is_deterministic_token() -> None:
    one = mp.boundary_for('"abc"')
    assert one == mp.boundary_for('"abc"') != mp.boundary_for('"abd"')
    assert len(one) <= 70 and all(c.isalnum() or c == "-" for c in one)
    header = mp.multipart_content_type("application/octet-stream", one)
    assert header == f'multipart/related; type="application/octet-stream"; boundary={one}'


def test_every_part_names_its_transfer_syntax() -> None:
    assert mp.content_type("image/jls", JLS) == f"image/jls; transfer-syntax={JLS}"
    head = mp.part_header("b", mp.content_type("application/octet-stream", EXPLICIT), first=False)
    assert head.startswith(b"\r\n--b\r\nContent-Type: ")
    assert b"transfer-syntax=1.2.840.10008.1.2.1\r\n\r\n" in head


# ---------------------------------------------------------------------------- Accept


def test_accept_quoted_and_unquoted_mean_the_same() -> None:
    quoted = mp.parse_accept(
        'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    )
    unquoted = mp.parse_accept(
        "multipart/related; type=application/octet-stream; transfer-syntax=*"
    )
    both = mp.parse_accept(
        'multipart/related; type="application/octet-stream"; transfer-syntax="*"'
    )
    assert quoted == unquoted == both
    (r,) = quoted
    assert r.is_multipart and r.part_type == "application/octet-stream"
    assert r.transfer_syntax == "*" and r.q == 1.0


def test_accept_transfer_syntax_inside_the_quoted_type() -> None:
    (r,) = mp.parse_accept('multipart/related; type="application/octet-stream; transfer-syntax=*"')
    assert r.part_type == "application/octet-stream" and r.transfer_syntax == "*"


def test_accept_q_values_order_stably_and_drop_zero() -> None:
    ranges = mp.parse_accept(
        'multipart/related; type="image/jp2";q=0.5, '
        'multipart/related; type="image/jls", '
        'multipart/related; type="application/octet-stream"; transfer-syntax=*; q=0.5, '
        "image/png; q=0"
    )
    assert [(r.part_type, r.q) for r in ranges] == [
        ("image/jls", 1.0),
        ("image/jp2", 0.5),
        ("application/octet-stream", 0.5),
    ]


def test_accept_commas_inside_quotes_and_case() -> None:
    (a, b) = mp.parse_accept('Multipart/Related; Type="Image/JLS"; foo="a,b", */*')
    assert a.media_type == "multipart/related" and a.part_type == "image/jls"
    assert a.params["foo"] == "a,b"
    assert b.media_type == "*/*"


def test_accept_absent_or_empty() -> None:
    assert mp.parse_accept(None) == []
    assert mp.parse_accept("  ") == []
    assert [r.media_type for r in mp.parse_accept("image/jpeg, , image/png")] == [
        "image/jpeg",
        "image/png",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        'multipart/related; type="application/dicom',
        "multipart/related; type",
        "image/jpeg; q=high",
        "image/jpeg; q=2",
        "not a type",
        "; q=1",
    ],
)
def test_accept_garbage_is_an_error(bad: str) -> None:
    with pytest.raises(mp.AcceptError):
        mp.parse_accept(bad)


# ---------------------------------------------------------------------------- frames


def _frames(
    accept: str | None, stored: str, *, decodable: bool = True, single: bool = False
) -> mp.FrameChoice:
    return mp.negotiate_frames(mp.parse_accept(accept), stored, decodable=decodable, single=single)


OHIF_QUOTED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
OHIF_UNQUOTED = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@pytest.mark.parametrize("accept", [OHIF_QUOTED, OHIF_UNQUOTED, 'multipart/related; type="*/*"'])
def test_frames_as_stored(accept: str) -> None:
    assert _frames(accept, JLS) == mp.FrameChoice("application/octet-stream", JLS, False)
    assert _frames(accept, EXPLICIT) == mp.FrameChoice("application/octet-stream", EXPLICIT, False)


def test_frames_default_is_explicit_little_endian() -> None:
    explicit = f"multipart/related; type=application/octet-stream; transfer-syntax={EXPLICIT}"
    for accept in (None, "*/*", "multipart/related; type=application/octet-stream", explicit):
        assert _frames(accept, EXPLICIT) == mp.FrameChoice(mp.OCTET_STREAM, EXPLICIT, False)
        assert _frames(accept, IMPLICIT) == mp.FrameChoice(mp.OCTET_STREAM, EXPLICIT, False)
        assert _frames(accept, JLS) == mp.FrameChoice(mp.OCTET_STREAM, EXPLICIT, True)
        assert _frames(accept, mp.BIG_ENDIAN) == mp.FrameChoice(mp.OCTET_STREAM, EXPLICIT, True)
    with pytest.raises(mp.NotAcceptable, match="not re-encoded"):
        _frames(None, JPEG_LOSSLESS, decodable=False)


def test_frames_compressed_types_only_when_stored_so() -> None:
    assert _frames('multipart/related; type="image/jls"', JLS) == mp.FrameChoice(
        "image/jls", JLS, False
    )
    assert _frames('multipart/related; type="image/jls"', JLS_NEAR).transfer_syntax == JLS_NEAR
    assert (
        _frames(f'multipart/related; type="image/jls"; transfer-syntax={JLS}', JLS).media_type
        == "image/jls"
    )
    assert (
        _frames('multipart/related; type="image/x-dicom-rle"', RLE).media_type
        == "image/x-dicom-rle"
    )
    assert _frames('multipart/related; type="image/jp2"', J2K).transfer_syntax == J2K
    assert _frames('multipart/related; type="image/*"', JLS) == mp.FrameChoice(
        "image/jls", JLS, False
    )
    for stored in (EXPLICIT, J2K, RLE):
        with pytest.raises(mp.NotAcceptable):
            _frames('multipart/related; type="image/jls"', stored)
    with pytest.raises(mp.NotAcceptable):
        _frames(f'multipart/related; type="image/jls"; transfer-syntax={JLS_NEAR}', JLS)


def test_frames_first_satisfiable_alternative_wins() -> None:
    accept = (
        'multipart/related; type="image/jp2", multipart/related; type="image/jls", ' + OHIF_QUOTED
    )
    assert _frames(accept, JLS).media_type == "image/jls"
    assert _frames(accept, EXPLICIT) == mp.FrameChoice(mp.OCTET_STREAM, EXPLICIT, False)
    by_q = f'{OHIF_QUOTED}; q=0.3, multipart/related; type="image/jls"; q=0.9'
    assert _frames(by_q, JLS).media_type == "image/jls"


def test_frames_single_part_only_for_one_frame() -> None:
    choice = _frames("image/jls", JLS, single=True)
    assert choice == mp.FrameChoice("image/jls", JLS, False, multipart=False)
    assert _frames("application/octet-stream", EXPLICIT, single=True).multipart is False
    with pytest.raises(mp.NotAcceptable):
        _frames("image/jls", JLS, single=False)


@pytest.mark.parametrize(
    "accept", ["text/html", "image/png", 'multipart/related; type="image/gif"']
)
def test_frames_unservable_accept(accept: str) -> None:
    with pytest.raises(mp.NotAcceptable, match="stored as"):
        _frames(accept, JLS, single=True)


# ---------------------------------------------------------------------------- instances


def _retrieve(accept: str | None, stored: set[str], *, single: bool = False) -> mp.RetrieveChoice:
    def can(stored_ts: str, wanted: str) -> bool:
        return wanted == EXPLICIT or (wanted == JLS and stored_ts == EXPLICIT)

    return mp.negotiate_retrieve(mp.parse_accept(accept), stored, can_transcode=can, single=single)


def test_retrieve_as_stored_by_default() -> None:
    for accept in (None, "*/*", 'multipart/related; type="application/dicom"',
                   'multipart/related; type="application/dicom"; transfer-syntax=*',
                   "multipart/related; type=application/dicom; transfer-syntax=*"):  # fmt: skip
        assert _retrieve(accept, {JLS, EXPLICIT}) == mp.RetrieveChoice(None, True)


def test_retrieve_specific_syntax_transcodes_or_refuses() -> None:
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'
    assert _retrieve(accept, {JLS, EXPLICIT}) == mp.RetrieveChoice(EXPLICIT, True)
    to_jls = f'multipart/related; type="application/dicom"; transfer-syntax={JLS}'
    assert _retrieve(to_jls, {JLS, EXPLICIT}) == mp.RetrieveChoice(JLS, True)
    with pytest.raises(mp.NotAcceptable, match="cannot make"):
        _retrieve(to_jls, {J2K})
    fallback = to_jls + ", multipart/related; type=application/dicom; transfer-syntax=*; q=0.1"
    assert _retrieve(fallback, {J2K}) == mp.RetrieveChoice(None, True)


def test_retrieve_single_part_for_one_instance() -> None:
    assert _retrieve("application/dicom", {JLS}, single=True) == mp.RetrieveChoice(None, False)
    with pytest.raises(mp.NotAcceptable, match="one instance only"):
        _retrieve("application/dicom", {JLS}, single=False)
    with pytest.raises(mp.NotAcceptable):
        _retrieve("application/zip", {JLS}, single=True)


# ---------------------------------------------------------------------------- others


def test_metadata_types() -> None:
    assert mp.negotiate_metadata([]) == mp.DICOM_JSON
    assert mp.negotiate_metadata(mp.parse_accept("application/json")) == mp.JSON
    assert mp.negotiate_metadata(mp.parse_accept("application/dicom+json, */*")) == mp.DICOM_JSON
    assert mp.negotiate_metadata(mp.parse_accept("*/*")) == mp.DICOM_JSON
    with pytest.raises(mp.NotAcceptable, match="xml"):
        mp.negotiate_metadata(mp.parse_accept('multipart/related; type="application/dicom+xml"'))


def test_rendered_types() -> None:
    assert mp.negotiate_rendered([]) == "image/jpeg"
    assert mp.negotiate_rendered(mp.parse_accept("image/png")) == "image/png"
    assert mp.negotiate_rendered(mp.parse_accept("image/gif, image/png;q=0.5")) == "image/png"
    assert mp.negotiate_rendered(mp.parse_accept("image/*")) == "image/jpeg"
    with pytest.raises(mp.NotAcceptable):
        mp.negotiate_rendered(mp.parse_accept("image/gif"))


def test_bulk_types() -> None:
    assert mp.negotiate_bulk([]) == mp.BulkChoice(True)
    assert mp.negotiate_bulk(mp.parse_accept('multipart/related; type="*/*"')).multipart
    assert not mp.negotiate_bulk(mp.parse_accept("application/octet-stream")).multipart
    with pytest.raises(mp.NotAcceptable):
        mp.negotiate_bulk(mp.parse_accept("text/plain"))
