"""The upload protocol is standard tus 1.0.0: the reference Python client (tuspy) uploads a
bundle to the hub in chunks, resumes it from a new client, and the hub commits the study."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
from pydicom import dcmread
from tusclient import client as tus

from sample_studies.generate import make_ct_series
from telerad.core.wire import BundleEntry, write_bundle
from tests.support.telerad_procs import InProcessHub


def test_reference_tus_client_uploads_a_bundle(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 4, seed=41, matrix=128)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    entries = []
    for f in files:
        data = f.read_bytes()
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        entries.append(
            (BundleEntry(uid, study_uid, hashlib.sha256(data).hexdigest(), len(data)), data)
        )
    buf = io.BytesIO()
    write_bundle(buf, entries)
    bundle = buf.getvalue()
    with InProcessHub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-tus")
        headers = {"Authorization": f"Bearer {token}"}
        metadata = {
            "study_uid": study_uid,
            "bundle_sha256": hashlib.sha256(bundle).hexdigest(),
            "filetype": "tlb",
        }
        endpoint = f"{hub.url}/api/v1/ingest/uploads"
        # First client: creates the upload and sends only the first chunk, then "crashes".
        first = tus.TusClient(endpoint, headers=headers).uploader(
            file_stream=io.BytesIO(bundle), chunk_size=4096, metadata=metadata
        )
        first.upload_chunk()
        assert first.offset == 4096
        # A new client resumes the same upload URL from the hub's offset (HEAD) to the end.
        second = tus.TusClient(endpoint, headers=headers).uploader(
            file_stream=io.BytesIO(bundle), url=first.url, chunk_size=64 * 1024
        )
        assert second.offset == 4096
        second.upload()
        assert second.offset == len(bundle)
        commit = httpx.post(
            f"{hub.url}/api/v1/ingest/studies/{study_uid}/commit",
            json={"sop_instance_uids": [e.sop_instance_uid for e, _ in entries]},
            headers=headers,
        )
        assert commit.json() == {"committed": True, "instance_count": 4, "missing": []}
        for inst in hub.ingest.study_instances(study_uid):
            original = next(d for e, d in entries if e.sop_instance_uid == inst.sop_instance_uid)
            assert hub.ingest.archive.retrieve(inst.archive_ref) == original
