"""``telerad gateway send``: push files and folders to any DICOM peer as a C-STORE SCU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE

from dicom_gateway import GatewayError
from dicom_gateway.station.dicom_send import (
    MAX_CONTEXTS,
    fit_to_association,
    plan_contexts,
    planned_syntaxes,
    refused_everything,
)

logger = logging.getLogger(__name__)


@dataclass
class SendReport:
    sent: int = 0
    warnings: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def parse_peer(peer: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (aet, host, port)."""
    try:
        aet, _, hostport = peer.partition("@")
        host, _, port = hostport.rpartition(":")
        if not (aet and host and port):
            raise ValueError
        return aet, host, int(port)
    except ValueError:
        raise GatewayError(f"peer must look like AET@HOST:PORT, not {peer!r}") from None


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        else:
            yield p


def send_paths(
    paths: Iterable[Path],
    peer: str,
    *,
    calling_aet: str = "TELERAD_SCU",
    progress: Callable[[int], None] | None = None,
) -> SendReport:
    aet, host, port = parse_peer(peer)
    report = SendReport()
    headers: list[tuple[Path, str, str]] = []
    for f in iter_files(paths):
        try:
            ds = dcmread(f, stop_before_pixels=True)
            headers.append((f, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            report.skipped.append((str(f), f"not a DICOM file: {exc}"))
    # One association per group of pairs whose contexts (with the per-SOP-class uncompressed
    # fallbacks) fit in 128 presentation contexts.
    groups: list[list[tuple[Path, str, str]]] = []
    group_pairs: list[set[tuple[str, str]]] = []
    seen: dict[tuple[str, str], int] = {}
    for item in headers:
        key = (item[1], item[2])
        if key not in seen:
            if not groups or len(planned_syntaxes(group_pairs[-1] | {key})) > MAX_CONTEXTS:
                groups.append([])
                group_pairs.append(set())
            group_pairs[-1].add(key)
            seen[key] = len(groups) - 1
        groups[seen[key]].append(item)
    for group in groups:
        ae = AE(ae_title=calling_aet)
        ae.maximum_pdu_size = 0
        for cx in plan_contexts({(i[1], i[2]) for i in group}):
            ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)  # type: ignore[arg-type]
        assoc = ae.associate(host, port, ae_title=aet)
        if refused_everything(assoc):
            for path, sop_class, ts in group:
                why = f"no presentation context for {UID(sop_class).name!r} with {UID(ts).name!r}"
                report.failed.append((str(path), f"not accepted by peer: {why}"))
            if progress:
                progress(len(group))
            continue
        if not assoc.is_established:
            if assoc.is_rejected and assoc.acceptor.primitive is not None:
                rj = assoc.acceptor.primitive
                why = f"rejected ({rj.result_str}, {rj.source_str}: {rj.reason_str})"
            else:
                why = "failed: no answer or aborted (is the peer listening on that port?)"
            raise GatewayError(f"association with {peer} {why}")
        try:
            for path, _, _ in group:
                try:
                    ds = dcmread(path)
                    fit_to_association(assoc, ds)
                    rsp = assoc.send_c_store(ds)
                except ValueError as exc:
                    report.failed.append((str(path), str(exc)))
                    continue
                status = int(getattr(rsp, "Status", -1)) if rsp else -1
                if status == 0:
                    report.sent += 1
                elif status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
                    report.sent += 1
                    report.warnings += 1
                else:
                    report.failed.append((str(path), f"status 0x{status:04X}"))
                if progress:
                    progress(1)
                if not assoc.is_established:
                    raise GatewayError(f"association with {peer} dropped")
        finally:
            if assoc.is_established:
                assoc.release()
    return report
