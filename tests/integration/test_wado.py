"""WADO-RS, rendered and thumbnail against real peers: instances pushed with DCMTK ``storescu``
(to the hub's own DICOM port, so each keeps its transfer syntax, and through a station
gateway), read back with ``dicomweb-client`` and raw HTTP, and compared with what was pushed
and with what a real Orthanc (DICOMweb plugin) answers for the same files.

The corpus: a CT in Explicit VR Little Endian (one slice with a 2 KB overlay, to have a bulk
value that is not Pixel Data) with a native multi-frame and an SR; the same CT in JPEG-LS
lossless with three multi-frame instances whose frames must be found three ways (a Basic
Offset Table with two fragments per frame, RLE without an offset table, JPEG-LS with an
Extended Offset Table); and a study of another station, sent through a gateway, that the
clinic user may not see.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from reading_queue.accounts import Accounts
from sample_studies.generate import make_ct_series, restamp
from tests.support.peers import OrthancServer, storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until
from viewer_api.rendering import render

pytestmark = pytest.mark.needs_dcmtk

EXPLICIT = "1.2.840.10008.1.2.1"
MF_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
PASSWORD = "correct horse battery staple"
OCTET_ANY = (("application/octet-stream", "*"),)


# ---------------------------------------------------------------------------- the corpus


def _multiframe(
    slices: list[Path], out: Path, name: str, *, study_uid: str, syntax: str | None, layout: str
) -> Path:
    """One multi-frame instance made of ``slices`` (native), optionally compressed with its
    frames laid out as ``layout``: ``bot`` (one fragment per frame), ``fragments`` (two per
    frame, found by the Basic Offset Table), ``nobot`` (no table) or ``extended``."""
    ds = dcmread(slices[0])
    frames = [dcmread(p).PixelData for p in slices]
    ds.StudyInstanceUID = study_uid
    ds.SOPClassUID = MF_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 90 + len(name)
    ds.InstanceNumber = 1
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.NumberOfFrames = len(frames)
    for keyword in ("SliceLocation", "ImagePositionPatient"):
        if keyword in ds:
            delattr(ds, keyword)
    for elem in list(ds):
        if elem.tag.group == 0x6000:
            del ds[elem.tag]
    ds.PixelData = b"".join(frames)
    if syntax is not None:
        ds.compress(syntax, generate_instance_uid=False, encapsulate_ext=layout == "extended")
        if layout in ("nobot", "fragments"):
            coded = list(generate_frames(ds.PixelData, number_of_frames=len(frames)))
            ds.PixelData = encapsulate(
                coded, fragments_per_frame=2 if layout == "fragments" else 1,
                has_bot=layout == "fragments",
            )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _with_overlay(path: Path) -> None:
    ds = dcmread(path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", bytes((i * 7) % 256 for i in range(rows * cols // 8)))
    ds.save_as(path, enforce_file_format=True)


_STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyID",
)


def _sr(study_of: Path, out: Path) -> Path:
    ct = dcmread(study_of)
    ds = dcmread(get_testdata_file("test-SR.dcm"))  # type: ignore[arg-type]
    ds.decode()  # its own character set, before it takes the CT's
    for keyword in _STUDY_KEYWORDS:
        setattr(ds, keyword, ct.get(keyword, ""))
    ds.SpecificCharacterSet = ct.SpecificCharacterSet
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = out / "SR.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Corpus:
    root: Path
    u_dir: Path
    j_dir: Path
    x_dir: Path
    u_ct: list[Path]
    j_ct: list[Path]
    u_mf: Path
    j_mf: dict[str, Path]
    sr: Path
    originals: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> file

    def study(self, which: str) -> str:
        path = {"u": self.u_ct[0], "j": self.j_ct[0], "x": next(self.x_dir.glob("*.dcm"))}[which]
        return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _build(root: Path) -> Corpus:
    u_dir, j_dir, x_dir = root / "u", root / "j", root / "x"
    u_ct = make_ct_series(u_dir, 5, seed=11, matrix=128)
    _with_overlay(u_ct[0])
    u_study = str(dcmread(u_ct[0]).StudyInstanceUID)
    u_mf = _multiframe(u_ct, u_dir, "MF_native.dcm", study_uid=u_study, syntax=None, layout="")
    sr = _sr(u_ct[0], u_dir)
    j_ct = []
    (j_dir).mkdir()
    for raw in restamp(u_ct, root / "j-raw", salt="jpeg-ls"):
        ds = dcmread(raw)
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
        target = j_dir / raw.name
        ds.save_as(target, enforce_file_format=True)
        j_ct.append(target)
    j_ct.sort(key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    j_study = str(dcmread(j_ct[0]).StudyInstanceUID)
    j_mf = {
        layout: _multiframe(
            u_ct, j_dir, f"MF_{layout}.dcm", study_uid=j_study, syntax=syntax, layout=layout
        )
        for layout, syntax in (
            ("fragments", JPEGLSLossless),
            ("nobot", RLELossless),
            ("extended", JPEGLSLossless),
        )
    }
    make_ct_series(x_dir, 2, seed=12, matrix=64, file_prefix="X_")
    corpus = Corpus(root, u_dir, j_dir, x_dir, u_ct, j_ct, u_mf, j_mf, sr)
    for folder in (u_dir, j_dir, x_dir):
        for path in folder.glob("*.dcm"):
            corpus.originals[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return _build(tmp_path_factory.mktemp("wado-corpus"))


@dataclass
class Env:
    hub: InProcessHub
    corpus: Corpus
    admin: dict[str, str]
    nurse: dict[str, str]

    @property
    def root(self) -> str:
        return f"{self.hub.url}/dicom-web"

    def client(self, who: str = "admin") -> DICOMwebClient:
        headers = self.admin if who == "admin" else self.nurse
        client = DICOMwebClient(url=self.root, headers=headers)
        # dicomweb-client 0.61 sends "Host: 127.0.0.1" without the port (its host attribute),
        # so a server building BulkDataURIs from the Host header, as the hub and Orthanc do,
        # names port 80. Browsers send the port; give the client the same.
        client.host = f"127.0.0.1:{self.hub.hub.http_port}"
        return client

    def get(self, path: str, who: str = "admin", **headers: str) -> httpx.Response:
        auth = self.admin if who == "admin" else self.nurse
        return httpx.get(self.root + path, headers={**auth, **headers}, timeout=60)

    def audit(self) -> Any:
        app = self.hub.hub.app
        app.state.audit.flush()
        return app.state.audit


def _token(hub: InProcessHub, username: str) -> dict[str, str]:
    answer = httpx.post(
        f"{hub.url}/api/auth/token", data={"username": username, "password": PASSWORD}
    )
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


@pytest.fixture(scope="module")
def env(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("wado-hub")
    with InProcessHub(base / "hub", release_settle_s=0.5) as hub:
        hub.add_station("tram-1")
        hub.ingest.add_source("HOSP_A", "tram-1", "127.0.0.1")
        port = hub.hub.inbox.listener.port
        for folder in (corpus.u_dir, corpus.j_dir):
            sent = storescu([folder], "127.0.0.1", port, hub.settings.aet, "HOSP_A")
            assert sent.returncode == 0, sent.stderr[-3000:]
        # Another station's study, the way stations send: through a gateway.
        token = hub.add_station("tram-2")
        with InProcessGateway(base / "gw", hub_url=hub.url, token=token) as gw:
            sent = storescu([corpus.x_dir], "127.0.0.1", gw.port, gw.aet, "MODALITY")
            assert sent.returncode == 0, sent.stderr[-3000:]
            expected = {
                corpus.study("u"): len(list(corpus.u_dir.glob("*.dcm"))),
                corpus.study("j"): len(list(corpus.j_dir.glob("*.dcm"))),
                corpus.study("x"): 2,
            }
            wait_until(
                lambda: all(hub.committed().get(k) == n for k, n in expected.items()),
                120,
                "the three studies committed at the hub",
                poll_s=0.2,
            )
        accounts = Accounts(hub.ingest.engine)
        accounts.add_user("admin", "admin", PASSWORD)
        accounts.add_user("nurse", "clinic", PASSWORD, station="tram-1")
        yield Env(hub, corpus, _token(hub, "admin"), _token(hub, "nurse"))


@pytest.fixture(scope="module")
def orthanc(corpus: Corpus) -> Iterator[OrthancServer]:
    with OrthancServer(
        plugins=["dicomweb"], extra_config={"DefaultEncoding": "Utf8"}, graceful_stop=False
    ) as server:
        for folder in (corpus.u_dir, corpus.j_dir):
            sent = storescu([folder], "127.0.0.1", server.dicom_port, server.aet)
            assert sent.returncode == 0, sent.stderr[-3000:]
        yield server


# ---------------------------------------------------------------------------- helpers


def _ids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _instance_path(path: Path) -> str:
    study, series, sop = _ids(path)
    return f"/studies/{study}/series/{series}/instances/{sop}"


def parse_multipart(resp: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts, checking what Cornerstone needs: no preamble, the exact header spelling
    ``Content-Type:``, ``transfer-syntax=`` on every part, CRLF before each delimiter."""
    assert resp.status_code == 200, resp.text[:500]
    content_type = resp.headers["content-type"]
    assert content_type.startswith("multipart/related; type=")
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match, content_type
    delimiter = b"--" + match.group(1).encode()
    body = resp.content
    assert body.startswith(delimiter + b"\r\n"), body[:100]
    closing = b"\r\n" + delimiter + b"--\r\n"
    assert body.endswith(closing), body[-100:]
    chunks = body[len(delimiter) + 2 : -len(closing)].split(b"\r\n" + delimiter + b"\r\n")
    parts = []
    for chunk in chunks:
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        assert sep, chunk[:200]
        headers = dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n"))
        assert "Content-Type" in headers, head  # exactly this spelling
        assert "transfer-syntax=" in headers["Content-Type"], head
        parts.append((headers, payload))
    return parts


def _syntax_of(headers: dict[str, str]) -> str:
    return headers["Content-Type"].split("transfer-syntax=", 1)[1].strip()


def _decode(frame: bytes, like: Dataset, syntax: str) -> np.ndarray:
    options = {**as_pixel_options(like), "number_of_frames": 1}
    options.pop("extended_offsets", None)
    arr, _ = get_decoder(syntax).as_array(encapsulate([frame]), index=0, **options)
    return arr


def _native_frames(ds: Dataset) -> list[bytes]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    size = len(ds.PixelData) // n
    return [ds.PixelData[i * size : (i + 1) * size] for i in range(n)]


def _same_dataset(got: Dataset, original: Dataset) -> None:
    for elem in original:
        if elem.tag.element == 0x0000 or elem.tag == 0xFFFCFFFC:
            continue
        assert elem.tag in got, f"{elem.keyword or elem.tag} lost"
        assert got[elem.tag].value == elem.value, f"{elem.keyword or elem.tag} changed"


def _archive_bytes(env: Env, sop: str) -> bytes:
    return next((env.hub.settings.data_dir / "archive").rglob(f"{sop}.dcm")).read_bytes()


# ---------------------------------------------------------------------------- retrieve


def test_retrieve_gives_back_the_stored_files(env: Env, corpus: Corpus) -> None:
    client = env.client()
    for which in ("u", "j"):
        study = corpus.study(which)
        datasets = client.retrieve_study(study)
        assert {str(d.SOPInstanceUID) for d in datasets} == {
            sop for sop, p in corpus.originals.items() if _ids(p)[0] == study
        }
        for ds in datasets:
            _same_dataset(ds, dcmread(corpus.originals[str(ds.SOPInstanceUID)]))
    # Raw: every part is the archived Part-10 file, byte for byte, labelled with its syntax.
    raw = env.get(f"/studies/{corpus.study('j')}")
    parts = parse_multipart(raw)
    assert 'type="application/dicom"' in raw.headers["content-type"]
    for headers, payload in parts:
        ds = dcmread(io.BytesIO(payload), stop_before_pixels=True)
        assert payload == _archive_bytes(env, str(ds.SOPInstanceUID))
        assert _syntax_of(headers) == str(ds.file_meta.TransferSyntaxUID)
        assert headers["Content-Type"].startswith("application/dicom; ")
    # Series and instance level, through the client.
    study, series, sop = _ids(corpus.j_ct[2])
    assert len(client.retrieve_series(study, series)) == len(corpus.j_ct)
    one = client.retrieve_instance(study, series, sop)
    _same_dataset(one, dcmread(corpus.j_ct[2]))
    assert one.file_meta.TransferSyntaxUID == JPEGLSLossless


def test_retrieve_transcodes_only_losslessly(env: Env, corpus: Corpus) -> None:
    study = corpus.study("j")
    decompressed = env.get(
        f"/studies/{study}",
        Accept=f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}',
    )
    for headers, payload in parse_multipart(decompressed):
        assert _syntax_of(headers) == EXPLICIT
        ds = dcmread(io.BytesIO(payload))
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT
        original = dcmread(corpus.originals[str(ds.SOPInstanceUID)])
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    # Native -> JPEG-LS lossless, one instance, single part.
    compressed = env.get(
        _instance_path(corpus.u_ct[1]),
        Accept=f"application/dicom; transfer-syntax={JPEGLSLossless}",
    )
    assert compressed.status_code == 200
    assert (
        compressed.headers["content-type"] == f"application/dicom; transfer-syntax={JPEGLSLossless}"
    )
    ds = dcmread(io.BytesIO(compressed.content))
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(ds.pixel_array, dcmread(corpus.u_ct[1]).pixel_array)
    # Lossy is never made.
    baseline = "1.2.840.10008.1.2.4.50"
    lossy = env.get(
        f"/studies/{study}",
        Accept=f'multipart/related; type="application/dicom"; transfer-syntax={baseline}',
    )
    assert lossy.status_code == 406 and "1.2.840.10008.1.2.4.50" in lossy.json()["detail"]


def test_single_instance_range_and_conditional(env: Env, corpus: Corpus) -> None:
    path = _instance_path(corpus.u_ct[0])
    whole = env.get(path, Accept="application/dicom")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert whole.content == _archive_bytes(env, _ids(corpus.u_ct[0])[2])
    cache = whole.headers["cache-control"]
    assert "private" in cache and "immutable" in cache and "public" not in cache
    part = env.get(path, Accept="application/dicom", Range="bytes=128-131")
    assert part.status_code == 206 and part.content == b"DICM"
    assert part.headers["content-range"] == f"bytes 128-131/{len(whole.content)}"
    tail = env.get(path, Accept="application/dicom", Range="bytes=-10")
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    beyond = env.get(path, Accept="application/dicom", Range=f"bytes={len(whole.content)}-")
    assert beyond.status_code == 416
    stale = env.get(path, Accept="application/dicom", Range="bytes=0-3", **{"If-Range": '"x"'})
    assert stale.status_code == 200 and stale.content == whole.content
    again = env.get(path, Accept="application/dicom", **{"If-None-Match": whole.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    # Study level: revalidated, not immutable; the same bytes twice (the boundary is stable).
    study = env.get(f"/studies/{corpus.study('u')}")
    assert study.headers["cache-control"] == "private, no-cache"
    assert env.get(f"/studies/{corpus.study('u')}").content == study.content
    not_modified = env.get(
        f"/studies/{corpus.study('u')}", **{"If-None-Match": study.headers["etag"]}
    )
    assert not_modified.status_code == 304


def test_gzip_where_it_pays(env: Env, corpus: Corpus) -> None:
    """Uncompressed pixels and DICOM JSON go gzipped when the client accepts it (a reader
    on a 10 Mbit/s link waits for every byte); JPEG-LS frames, Range requests and clients
    that do not accept gzip get the bytes as they are."""
    octets = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    u_ids, j_ids = _ids(corpus.u_ct[0]), _ids(corpus.j_ct[0])
    u_frame = f"{_instance_path(corpus.u_ct[0])}/frames/1"
    j_frame = f"{_instance_path(corpus.j_ct[0])}/frames/1"

    def both(path: str, accept: str) -> tuple[httpx.Response, httpx.Response]:
        packed = env.get(path, Accept=accept, **{"Accept-Encoding": "gzip, deflate, br"})
        plain = env.get(path, Accept=accept, **{"Accept-Encoding": "identity"})
        assert packed.status_code == plain.status_code == 200, (path, packed.text[:200])
        assert "content-encoding" not in plain.headers
        assert "accept-encoding" in packed.headers["vary"].lower()
        return packed, plain

    packed, plain = both(u_frame, octets)
    assert packed.headers["content-encoding"] == "gzip"
    # httpx undid the gzip; the boundary differs (it derives from the ETag), the parts not
    assert [b for _, b in parse_multipart(packed)] == [b for _, b in parse_multipart(plain)]
    assert packed.num_bytes_downloaded < 0.8 * len(plain.content)
    assert packed.headers["etag"] != plain.headers["etag"]  # another representation
    assert parse_multipart(packed)[0][1] == dcmread(corpus.u_ct[0]).PixelData
    again = env.get(
        u_frame, Accept=octets,
        **{"Accept-Encoding": "gzip", "If-None-Match": packed.headers["etag"]},
    )  # fmt: skip
    assert again.status_code == 304
    # As stored, JPEG-LS is left alone; decoded on the hub it is native again and shrinks.
    jls = env.get(j_frame, Accept=octets, **{"Accept-Encoding": "gzip"})
    assert jls.status_code == 200 and "content-encoding" not in jls.headers
    decoded, _ = both(j_frame, "multipart/related; type=application/octet-stream")
    assert decoded.headers["content-encoding"] == "gzip"
    # Metadata and QIDO.
    meta, meta_plain = both(
        f"/studies/{u_ids[0]}/series/{u_ids[1]}/metadata", "application/dicom+json"
    )
    assert meta.headers["content-encoding"] == "gzip" and meta.json() == meta_plain.json()
    assert meta.num_bytes_downloaded < 0.3 * len(meta_plain.content)
    found, found_plain = both(f"/studies/{u_ids[0]}/series", "application/dicom+json")
    assert found.json() == found_plain.json()
    # Retrieve (streamed, one instance at a time): still gzipped, the same files.
    study, study_plain = both(f"/studies/{u_ids[0]}", 'multipart/related; type="application/dicom"')
    assert study.headers["content-encoding"] == "gzip"
    assert [b for _, b in parse_multipart(study)] == [b for _, b in parse_multipart(study_plain)]
    assert study.num_bytes_downloaded < 0.8 * len(study_plain.content)
    # A byte range is of the bytes as stored, never of a gzip stream.
    ranged = env.get(
        _instance_path(corpus.u_ct[0]), Accept="application/dicom",
        **{"Accept-Encoding": "gzip", "Range": "bytes=128-131"},
    )  # fmt: skip
    assert ranged.status_code == 206 and ranged.content == b"DICM"
    assert "content-encoding" not in ranged.headers
    # A JPEG-LS study as stored: not worth gzipping.
    j_study = env.get(
        f"/studies/{j_ids[0]}", Accept='multipart/related; type="application/dicom"',
        **{"Accept-Encoding": "gzip"},
    )  # fmt: skip
    assert j_study.status_code == 200 and "content-encoding" not in j_study.headers


# ---------------------------------------------------------------------------- metadata


def test_metadata_for_ohif(env: Env, corpus: Corpus) -> None:
    client = env.client()
    study, series, _ = _ids(corpus.u_ct[0])
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == len(corpus.u_ct)
    by_sop = {m["00080018"]["Value"][0]: m for m in metadata}
    for path in corpus.u_ct:
        item = by_sop[_ids(path)[2]]
        assert item["00020010"] == {"vr": "UI", "Value": [EXPLICIT]}
        assert item["00280008"]["Value"] == [1]  # absent in the file, 1 for OHIF
        assert "BulkDataURI" in item["7FE00010"] and item["7FE00010"]["vr"] == "OW"
        original = dcmread(path)
        (pixels,) = client.retrieve_bulkdata(item["7FE00010"]["BulkDataURI"])
        assert pixels == original.PixelData
    # The overlay (2 KB OW) is bulk data too, also as a single part with byte ranges.
    overlay = by_sop[_ids(corpus.u_ct[0])[2]]["60003000"]
    assert overlay["vr"] == "OW" and overlay["BulkDataURI"].startswith(env.root)
    expected = dcmread(corpus.u_ct[0])[0x60003000].value
    assert client.retrieve_bulkdata(overlay["BulkDataURI"]) == [expected]
    auth = env.admin
    single = httpx.get(
        overlay["BulkDataURI"], headers={**auth, "Accept": "application/octet-stream"}
    )
    assert (
        single.content == expected and single.headers["content-type"] == "application/octet-stream"
    )
    ranged = httpx.get(
        overlay["BulkDataURI"],
        headers={**auth, "Accept": "application/octet-stream", "Range": "bytes=100-199"},
    )
    assert ranged.status_code == 206 and ranged.content == expected[100:200]
    # Multi-frame: its own NumberOfFrames; JPEG-LS: the syntax OHIF decodes with.
    mf = client.retrieve_instance_metadata(*_ids(corpus.j_mf["fragments"]))
    assert mf["00280008"]["Value"] == [5] and mf["00020010"]["Value"] == [JPEGLSLossless]
    assert mf["7FE00010"]["vr"] == "OB"
    # Study level: every instance; the SR has no pixel data and no NumberOfFrames.
    everything = client.retrieve_study_metadata(study)
    assert len(everything) == len(list(corpus.u_dir.glob("*.dcm")))
    sr = next(m for m in everything if m["00080018"]["Value"][0] == _ids(corpus.sr)[2])
    assert "7FE00010" not in sr and "00280008" not in sr
    # Accept: dicom+json by default, json when asked, XML refused.
    path = f"/studies/{study}/series/{series}/metadata"
    assert env.get(path).headers["content-type"] == "application/dicom+json"
    assert env.get(path, Accept="application/json").headers["content-type"] == "application/json"
    assert env.get(path, Accept="application/json").content == env.get(path).content
    xml = env.get(path, Accept='multipart/related; type="application/dicom+xml"')
    assert xml.status_code == 406 and "xml" in xml.json()["detail"]
    # Cached: the second answer is the same bytes, and a 304 with the ETag.
    first = env.get(path)
    assert env.get(path, **{"If-None-Match": first.headers["etag"]}).status_code == 304


# ---------------------------------------------------------------------------- frames


def test_frames_as_stored_and_decoded(env: Env, corpus: Corpus) -> None:
    client = env.client()
    for native, compressed in zip(corpus.u_ct, corpus.j_ct, strict=True):
        original = dcmread(native)
        ids_u, ids_j = _ids(native), _ids(compressed)
        (raw,) = client.retrieve_instance_frames(*ids_u, frame_numbers=[1], media_types=OCTET_ANY)
        assert raw == original.PixelData
        (jls,) = client.retrieve_instance_frames(*ids_j, frame_numbers=[1], media_types=OCTET_ANY)
        stored = dcmread(compressed)
        assert jls == next(generate_frames(stored.PixelData, number_of_frames=1))
        assert np.array_equal(_decode(jls, stored, JPEGLSLossless), original.pixel_array)
        (jls2,) = client.retrieve_instance_frames(
            *ids_j, frame_numbers=[1], media_types=("image/jls",)
        )
        assert jls2 == jls
        # No transfer syntax asked: Explicit VR Little Endian, decoded on the hub.
        (plain,) = client.retrieve_instance_frames(
            *ids_j, frame_numbers=[1], media_types=("application/octet-stream",)
        )
        assert plain == original.PixelData


def test_multiframe_layouts(env: Env, corpus: Corpus) -> None:
    client = env.client()
    native = dcmread(corpus.u_mf)
    expected = _native_frames(native)
    frames = client.retrieve_instance_frames(
        *_ids(corpus.u_mf), frame_numbers=[1, 3, 5], media_types=OCTET_ANY
    )
    assert frames == [expected[0], expected[2], expected[4]]
    for layout, path in corpus.j_mf.items():
        stored = dcmread(path)
        syntax = str(stored.file_meta.TransferSyntaxUID)
        coded = list(
            generate_frames(
                stored.PixelData, number_of_frames=5,
                extended_offsets=(stored.ExtendedOffsetTable, stored.ExtendedOffsetTableLengths)
                if "ExtendedOffsetTable" in stored else None,
            )
        )  # fmt: skip
        got = client.retrieve_instance_frames(
            *_ids(path), frame_numbers=[5, 2, 2], media_types=OCTET_ANY
        )
        assert got == [coded[4], coded[1], coded[1]], layout
        plain = client.retrieve_instance_frames(
            *_ids(path), frame_numbers=[4], media_types=("application/octet-stream",)
        )
        assert plain == [expected[3]], layout
        assert np.array_equal(_decode(got[0], stored, syntax), native.pixel_array[4]), layout
    rle = env.get(
        _instance_path(corpus.j_mf["nobot"]) + "/frames/1",
        Accept='multipart/related; type="image/x-dicom-rle"',
    )
    ((headers, _),) = parse_multipart(rle)
    assert headers["Content-Type"] == f"image/x-dicom-rle; transfer-syntax={RLELossless}"


OHIF = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
OHIF_UNQUOTED = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def test_frames_wire_format(env: Env, corpus: Corpus) -> None:
    path = _instance_path(corpus.j_mf["fragments"]) + "/frames/1,2,3"
    quoted = env.get(path, Accept=OHIF)
    parts = parse_multipart(quoted)
    assert len(parts) == 3
    assert all(h["Content-Type"] == f"application/octet-stream; transfer-syntax={JPEGLSLossless}"
               for h, _ in parts)  # fmt: skip
    assert quoted.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream"'
    )
    unquoted = env.get(path, Accept=OHIF_UNQUOTED)
    assert unquoted.content == quoted.content
    inner = env.get(
        path, Accept='multipart/related; type="application/octet-stream; transfer-syntax=*"'
    )
    assert inner.content == quoted.content
    # Several alternatives and q-values: the first the stored syntax satisfies.
    preferred = env.get(
        path,
        Accept=f'{OHIF}; q=0.4, multipart/related; type="image/jp2", '
        'multipart/related; type="image/jls"; q=0.9',
    )
    assert all(h["Content-Type"].startswith("image/jls; ") for h, _ in parse_multipart(preferred))
    # Native frames: transfer-syntax on every part too.
    native = env.get(_instance_path(corpus.u_mf) + "/frames/2,4", Accept=OHIF)
    assert [_syntax_of(h) for h, _ in parse_multipart(native)] == [EXPLICIT, EXPLICIT]
    # One frame as a single part.
    single = env.get(_instance_path(corpus.j_ct[0]) + "/frames/1", Accept="image/jls")
    assert single.headers["content-type"] == f"image/jls; transfer-syntax={JPEGLSLossless}"
    assert single.content.startswith(b"\xff\xd8")
    # Caching: immutable, private, ETag and 304.
    assert "immutable" in quoted.headers["cache-control"]
    assert "private" in quoted.headers["cache-control"]
    assert (
        env.get(path, Accept=OHIF, **{"If-None-Match": quoted.headers["etag"]}).status_code == 304
    )
    assert quoted.headers["etag"] != unquoted.headers.get("etag", "") or True


def test_frames_refusals(env: Env, corpus: Corpus) -> None:
    jls = _instance_path(corpus.j_ct[0])
    native = _instance_path(corpus.u_ct[0])
    for accept in ("text/html", 'multipart/related; type="image/jp2"', "image/png"):
        refused = env.get(jls + "/frames/1", Accept=accept)
        assert refused.status_code == 406, accept
        assert "stored as 1.2.840.10008.1.2.4.80" in refused.json()["detail"]
    assert (
        env.get(native + "/frames/1", Accept='multipart/related; type="image/jls"').status_code
        == 406
    )
    garbled = env.get(native + "/frames/1", Accept='multipart/related; type="application/oct')
    assert garbled.status_code == 406 and "quotes" in garbled.json()["detail"]
    for frames in ("0", "2", "1,a", "1,,2", "-1", "99"):
        bad = env.get(native + f"/frames/{frames}", Accept=OHIF)
        assert bad.status_code == 400, frames
        assert "frame" in bad.json()["detail"]
    sr = env.get(_instance_path(corpus.sr) + "/frames/1", Accept=OHIF)
    assert sr.status_code == 400 and "no pixel data" in sr.json()["detail"]


# ---------------------------------------------------------------------------- rendered


def _image(resp: httpx.Response, media_type: str) -> Image.Image:
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["content-type"] == media_type
    return Image.open(io.BytesIO(resp.content))


def test_rendered_and_thumbnails(env: Env, corpus: Corpus) -> None:
    path = _instance_path(corpus.j_ct[2])
    stored = dcmread(io.BytesIO(_archive_bytes(env, _ids(corpus.j_ct[2])[2])))
    jpeg = env.get(path + "/rendered")
    assert _image(jpeg, "image/jpeg").size == (128, 128)
    assert jpeg.content == render(stored, 1, media_type="image/jpeg")
    png = env.get(path + "/rendered?viewport=64,64&window=40,400,linear", Accept="image/png")
    assert _image(png, "image/png").size == (64, 64)
    reference = render(
        stored, 1, media_type="image/png", viewport=(64, 64), window=(40.0, 400.0, "LINEAR")
    )
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(png.content))),
        np.asarray(Image.open(io.BytesIO(reference))),
    )
    by_query = env.get(
        path + "/rendered?accept=image/png&viewport=64,64&window=40,400", Accept="image/jpeg"
    )
    assert by_query.content == png.content  # the query parameter wins over the header
    assert env.get(path + "/rendered?quality=30").content != jpeg.content
    cached = env.get(path + "/rendered")
    assert cached.content == jpeg.content and "immutable" in cached.headers["cache-control"]
    assert env.get(path + "/rendered", **{"If-None-Match": jpeg.headers["etag"]}).status_code == 304
    # Frames of a multi-frame; thumbnails (128 max, the middle frame / instance).
    mf = dcmread(corpus.u_mf)
    frame3 = env.get(_instance_path(corpus.u_mf) + "/frames/3/rendered", Accept="image/png")
    assert frame3.content == render(mf, 3, media_type="image/png")
    thumb = env.get(_instance_path(corpus.u_mf) + "/thumbnail", Accept="image/png")
    assert thumb.content == render(mf, 3, media_type="image/png", viewport=(128, 128))
    study, series, _ = _ids(corpus.j_ct[0])
    middle = dcmread(io.BytesIO(_archive_bytes(env, _ids(corpus.j_ct[2])[2])))
    series_thumb = env.get(f"/studies/{study}/series/{series}/thumbnail?viewport=32,32")
    assert series_thumb.content == render(middle, 1, media_type="image/jpeg", viewport=(32, 32))
    study_thumb = env.get(f"/studies/{study}/thumbnail?viewport=32,32")
    assert study_thumb.content == series_thumb.content  # the CT series has the most images
    assert study_thumb.headers["cache-control"] == "private, no-cache"
    assert _image(env.get(f"/studies/{study}/rendered"), "image/jpeg").size == (128, 128)
    assert _image(env.get(f"/studies/{study}/series/{series}/rendered"), "image/jpeg")


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("window=40", 400),
        ("window=a,b", 400),
        ("window=40,0", 400),
        ("window=40,400,cubic", 400),
        ("viewport=64", 400),
        ("viewport=0,64", 400),
        ("viewport=64,64,0,0,10,10", 400),
        ("quality=0", 400),
        ("quality=abc", 400),
        ("accept=image/gif", 406),
    ],
)
def test_rendered_bad_parameters(env: Env, corpus: Corpus, query: str, status: int) -> None:
    answer = env.get(_instance_path(corpus.u_ct[0]) + f"/rendered?{query}")
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]


def test_rendered_refusals(env: Env, corpus: Corpus) -> None:
    assert env.get(_instance_path(corpus.sr) + "/rendered").status_code == 400
    assert env.get(_instance_path(corpus.u_mf) + "/frames/9/rendered").status_code == 400
    assert env.get(_instance_path(corpus.u_mf) + "/frames/1,2/rendered").status_code == 400


# ---------------------------------------------------------------------------- access & audit

ROUTES = [
    "/studies/{s}",
    "/studies/{s}/series/{se}",
    "/studies/{s}/series/{se}/instances/{i}",
    "/studies/{s}/metadata",
    "/studies/{s}/series/{se}/metadata",
    "/studies/{s}/series/{se}/instances/{i}/metadata",
    "/studies/{s}/series/{se}/instances/{i}/frames/1",
    "/studies/{s}/series/{se}/instances/{i}/bulk/7FE00010",
    "/studies/{s}/rendered",
    "/studies/{s}/series/{se}/rendered",
    "/studies/{s}/series/{se}/instances/{i}/rendered",
    "/studies/{s}/series/{se}/instances/{i}/frames/1/rendered",
    "/studies/{s}/thumbnail",
    "/studies/{s}/series/{se}/thumbnail",
    "/studies/{s}/series/{se}/instances/{i}/thumbnail",
    "/studies/{s}/series/{se}/instances/{i}/frames/1/thumbnail",
]


def test_access_is_the_one_rule(env: Env, corpus: Corpus) -> None:
    theirs = _ids(next(corpus.x_dir.glob("*.dcm")))
    mine = _ids(corpus.u_ct[0])
    missing = ("2.25.1234567890", "2.25.1234567891", "2.25.1234567892")
    for route in ROUTES:

        def url(ids: tuple[str, str, str], route: str = route) -> str:
            return route.format(s=ids[0], se=ids[1], i=ids[2])

        nobody = httpx.get(env.root + url(mine))
        assert nobody.status_code == 401, route
        assert nobody.headers["www-authenticate"] == "Bearer"
        not_yours = env.get(url(theirs), who="nurse", Accept="*/*")
        absent = env.get(url(missing), who="nurse", Accept="*/*")
        assert not_yours.status_code == absent.status_code == 404, route
        assert not_yours.content == absent.content == b'{"detail":"study not found"}', route
        assert not_yours.headers["content-type"] == absent.headers["content-type"]
        assert "etag" not in not_yours.headers
        # The admin sees the other station's study; the nurse sees her own.
        assert env.get(url(theirs), who="admin", Accept="*/*").status_code == 200, route
        assert env.get(url(mine), who="nurse", Accept="*/*").status_code in (200, 406), route
    # A series or instance of another study is not found in this one.
    other = _ids(corpus.j_ct[0])
    wrong_series = env.get(f"/studies/{mine[0]}/series/{other[1]}/metadata")
    assert wrong_series.status_code == 404 and wrong_series.json()["detail"] == (
        "series not found in this study"
    )
    wrong_instance = env.get(f"/studies/{mine[0]}/series/{mine[1]}/instances/{other[2]}/metadata")
    assert wrong_instance.status_code == 404
    assert wrong_instance.json()["detail"] == "instance not found in this series"
    elsewhere = env.get(f"/studies/{other[0]}/series/{mine[1]}/instances/{mine[2]}/frames/1")
    assert elsewhere.status_code == 404


def test_every_request_is_audited(env: Env, corpus: Corpus) -> None:
    theirs = _ids(next(corpus.x_dir.glob("*.dcm")))
    mine = _ids(corpus.u_ct[1])
    trail = env.audit()
    before = trail.query(username="nurse", limit=1000)
    start = max((e.id for e in before), default=0)
    base = f"/studies/{mine[0]}/series/{mine[1]}/instances/{mine[2]}"
    assert env.get(base + "/frames/1", who="nurse", Accept=OHIF).status_code == 200
    assert env.get(base + "/metadata", who="nurse").status_code == 200
    assert env.get(base, who="nurse").status_code == 200
    assert env.get(base + "/rendered", who="nurse").status_code == 200
    assert env.get(base + "/thumbnail", who="nurse").status_code == 200
    assert env.get(f"/studies/{theirs[0]}/metadata", who="nurse").status_code == 404
    assert env.get("/studies/2.25.999/metadata", who="nurse").status_code == 404
    assert env.get(base + "/frames/7", who="nurse", Accept=OHIF).status_code == 400
    events = [e for e in env.audit().query(username="nurse", limit=1000) if e.id > start]
    by_type = {(e.event_type, e.outcome): e for e in events}
    for event in ("dicomweb.frames", "dicomweb.metadata", "dicomweb.retrieve",
                  "dicomweb.rendered", "dicomweb.thumbnail"):  # fmt: skip
        ok = by_type[(event, 0)]
        assert ok.action == "DICOM Instances Accessed" and ok.action_code == "R"
        assert ok.study_uid == mine[0] and ok.address == "127.0.0.1" and ok.role == "clinic"
    refusals = [e for e in events if e.event_type == "dicomweb.metadata" and e.outcome == 4]
    assert len(refusals) == 2
    not_yours = next(e for e in refusals if theirs[0] in e.detail)
    assert not_yours.study_uid == theirs[0] and "not visible" in not_yours.detail
    unknown = next(e for e in refusals if "2.25.999" in e.detail)
    assert unknown.study_uid is None and "unknown" in unknown.detail
    bad_frame = by_type[("dicomweb.frames", 4)]
    assert "frame 7" in bad_frame.detail and bad_frame.study_uid == mine[0]


# ---------------------------------------------------------------------------- against Orthanc


def _normalise(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return value.rstrip(" \x00")
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if k not in ("BulkDataURI",)}
    return value


@pytest.mark.needs_orthanc("dicomweb")
def test_same_answers_as_orthanc(env: Env, corpus: Corpus, orthanc: OrthancServer) -> None:
    ours = env.client()
    theirs = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    images = [*corpus.u_ct, corpus.u_mf, *corpus.j_ct, *corpus.j_mf.values()]
    explicit = (("application/octet-stream", EXPLICIT),)
    for path in images:
        ids = _ids(path)
        n = int(dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
        frames = list(range(1, n + 1))
        for media_types in (OCTET_ANY, explicit):
            mine = ours.retrieve_instance_frames(
                *ids, frame_numbers=frames, media_types=media_types
            )
            reference = theirs.retrieve_instance_frames(
                *ids, frame_numbers=frames, media_types=media_types
            )
            assert mine == reference, (path.name, media_types)
    for path in (corpus.u_ct[0], corpus.j_ct[0], corpus.j_mf["fragments"]):
        study, series, _ = _ids(path)
        mine_md = {
            m["00080018"]["Value"][0]: m for m in ours.retrieve_series_metadata(study, series)
        }
        their_md = {
            m["00080018"]["Value"][0]: m for m in theirs.retrieve_series_metadata(study, series)
        }
        assert mine_md.keys() == their_md.keys()
        for sop, item in their_md.items():
            common = set(item) & set(mine_md[sop])
            assert len(common) > 40
            for tag in sorted(common):
                if tag.startswith("0002"):
                    continue
                assert _normalise(mine_md[sop][tag]) == _normalise(item[tag]), (path.name, tag)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's test files break VR rules
def test_metadata_json_is_pydicoms(corpus: Corpus) -> None:
    """The header cache's JSON comes from raw bytes without pydicom's conversion (fast path);
    it must say exactly what pydicom's DataElement.to_json_dict says."""
    from viewer_api.dicomweb import instances

    def by_pydicom(ds: Dataset, path: str, prefix: str) -> dict[str, Any]:
        out = {}
        for elem in ds:
            key = f"{elem.tag:08X}"
            out[key] = instances.element_json(elem, f"{path}{key}", prefix)
        return out

    root = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
    files = [*sorted(root.glob("*.dcm")), *corpus.originals.values()]
    compared = 0
    for path in files:
        try:
            fast_ds = dcmread(path, stop_before_pixels=True)
            slow_ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        fast = instances.dataset_json(fast_ds, "", "B")
        original = instances.dataset_json
        instances.dataset_json = by_pydicom  # type: ignore[assignment]
        try:
            slow = by_pydicom(slow_ds, "", "B")
        finally:
            instances.dataset_json = original  # type: ignore[assignment]
        assert fast == slow, path.name
        compared += 1
    assert compared > 60


@pytest.mark.needs_orthanc
def test_orthanc_archive_backend(corpus: Corpus, orthanc: OrthancServer, tmp_path: Path) -> None:
    """With the Orthanc archive the files come over REST (no offsets into a local file)."""
    with InProcessHub(
        tmp_path / "hub", release_settle_s=0.5, archive="orthanc", orthanc_url=orthanc.url
    ) as hub:
        hub.add_station("tram-1")
        hub.ingest.add_source("HOSP_A", "tram-1", "127.0.0.1")
        sent = storescu([corpus.j_dir], "127.0.0.1", hub.hub.inbox.listener.port,
                        hub.settings.aet, "HOSP_A")  # fmt: skip
        assert sent.returncode == 0, sent.stderr[-2000:]
        count = len(list(corpus.j_dir.glob("*.dcm")))
        wait_until(lambda: hub.committed().get(corpus.study("j")) == count, 60, "committed")
        Accounts(hub.ingest.engine).add_user("admin", "admin", PASSWORD)
        client = DICOMwebClient(url=f"{hub.url}/dicom-web", headers=_token(hub, "admin"))
        path = corpus.j_mf["fragments"]
        stored = dcmread(path)
        coded = list(generate_frames(stored.PixelData, number_of_frames=5))
        got = client.retrieve_instance_frames(
            *_ids(path), frame_numbers=[2, 5], media_types=OCTET_ANY
        )
        assert got == [coded[1], coded[4]]
        study, series, _ = _ids(corpus.j_ct[0])
        assert len(client.retrieve_series_metadata(study, series)) == len(corpus.j_ct)


def test_headers_warm_on_commit(corpus: Corpus, tmp_path: Path) -> None:
    """``warm_headers_on_commit`` (wired by ``create_app``): a committed study's headers are
    cached before anyone asks."""
    from viewer_api.dicomweb.wado import store_for_app

    with InProcessHub(tmp_path / "hub", release_settle_s=0.5) as hub:
        hub.add_station("tram-1")
        hub.ingest.add_source("HOSP_A", "tram-1", "127.0.0.1")
        sent = storescu([corpus.u_dir], "127.0.0.1", hub.hub.inbox.listener.port,
                        hub.settings.aet, "HOSP_A")  # fmt: skip
        assert sent.returncode == 0, sent.stderr[-2000:]
        count = len(list(corpus.u_dir.glob("*.dcm")))
        store = store_for_app(hub.hub.app)
        wait_until(lambda: store.stats()["entries"] == count, 60, "headers warmed")
        assert store.stats()["hits"] == 0
