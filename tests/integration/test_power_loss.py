"""Power-loss drill (issue 9 §5): the gateway's data dir on a lazy filesystem, cut at random.

``kill -9`` leaves the kernel's page cache intact, so it cannot catch a missing ``fsync``.
Here the gateway's ``--data-dir`` is a ``LazyFS`` mount (tests/support/lazyfs.py), which
keeps every write and directory change since the last fsync in memory and drops them on a
simulated power cut. The hub runs on a normal directory; it is the witness.

A modality (pynetdicom, as in ``test_kill9_drill``: each C-STORE's status recorded, only
Success counts as acknowledged, the rest sent again in the next round) pushes several
studies while the power is cut >= 20 times at random moments: while it is storing, while a
bundle upload to the hub is under way, and sometimes again during the restart's recovery.
A cut is: freeze the durable state (``power_off(0)``: every later file-system call fails
with EIO, so nothing the gateway does after that moment can become durable or be
acknowledged on the strength of a later write), ``kill -9`` the gateway and anything else
holding files there, ``cut()`` (drop what was not durable and remount the backing dir: what
a disk would hold after the power came back), start the gateway again.

Operator decisions ride along: before some cuts ``telerad gateway priority UID stat`` is
run (and must have answered), before others an instance the gateway must refuse (a
SeriesInstanceUID longer than 64 characters, or no SOP Instance UID in the dataset) is sent
and its refusal recorded. After every restart ``telerad gateway status --json`` must still
show each such study as stat and each quarantine entry, with its file.

One drill runs per module (``drill`` fixture); three tests judge it, so a lost decision and
a lost instance fail separately, each saying what was lost:

* ``test_power_loss_acknowledged_instances_reach_the_hub_exactly_once``
* ``test_power_loss_keeps_operator_priorities``
* ``test_power_loss_keeps_quarantine_entries``

Marked ``needs_fuse``: without FUSE the tests skip with the reason (``TELERAD_REQUIRE_PEERS=1``:
they fail).
``TELERAD_DRILL_SEED=<n>`` replays a run's choices (not its timing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.integration.test_fault_drills import (
    HUB_ENV,
    LOOPBACK,
    BaseSeries,
    DrillGateway,
    Instance,
    Modality,
    _drill_seed,
    _uploading,
    dataset_part,
    expected_by_study,
    gw_db,
    hub_committed,
    hub_db,
    ro_query,
)
from tests.support.faultproxy import FaultProxy
from tests.support.lazyfs import FuseUnavailable, LazyFS
from tests.support.peers import require_peer
from tests.support.telerad_procs import HubProcess, wait_until

# needs_fuse: tests/conftest.py skips (TELERAD_REQUIRE_PEERS=1: fails) before the drill is
# set up when FUSE is missing here, saying why (lazyfs.fuse_unavailable_reason).
pytestmark = [pytest.mark.slow, pytest.mark.needs_fuse]

logger = logging.getLogger(__name__)

POWER_CUTS = 22  # at random moments while running; start-up cuts come on top
RECEIVING_CUTS = frozenset(range(0, POWER_CUTS, 2))  # the others wait for an upload
PRIORITY_BEFORE = frozenset({1, 5, 9, 13, 17})  # `gateway priority … stat` before these cuts
QUARANTINE_BEFORE = frozenset({2, 7, 12, 16, 20})  # a refused instance before these cuts
STARTUP_CUT_P = 0.15  # chance that a restart is itself cut during start-up recovery
DRAIN_S = 150.0
UPLOAD_WAIT_S = 45.0
GATEWAY_ENV = {"TELERAD_BUNDLE_MAX_MB": "4"}


# -- the operator's side: the CLI, run as a person would -------------------------------------


def gateway_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", "gateway", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@dataclass
class Decision:
    """``gateway priority STUDY stat``, answered, before cut ``before_cut``."""

    study_uid: str
    before_cut: int
    was: str
    answer: str
    lost_after: list[str] = field(default_factory=list)


@dataclass
class Refusal:
    """An instance the gateway refused (so quarantined), before cut ``before_cut``."""

    kind: str
    calling_aet: str
    sop_uid: str
    dataset_sha256: str
    before_cut: int
    status: int | None
    lost_after: list[str] = field(default_factory=list)


@dataclass
class Drill:
    seed: int
    seconds: float = 0.0
    cuts: list[dict[str, Any]] = field(default_factory=list)
    sent: list[Instance] = field(default_factory=list)
    acked: dict[str, Instance] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    drained: str = ""
    stalls: list[str] = field(default_factory=list)
    power_off_refusals: int = 0
    audit: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    summary: str = ""


def check_decisions(drill: Drill, gw_dir: Path, when: str) -> None:
    """``gateway status --json`` must still show every decision made so far."""
    if not drill.decisions and not drill.refusals:
        return
    res = gateway_cli(gw_dir, "status", "--json")
    if res.returncode != 0:
        items: list[Decision | Refusal] = [*drill.decisions, *drill.refusals]
        for item in items:
            item.lost_after.append(f"{when}: `gateway status` failed: {res.stderr[-500:]}")
        return
    status = json.loads(res.stdout)
    studies = {s["study_uid"]: s for s in status["studies"]}
    for d in drill.decisions:
        shown = studies.get(d.study_uid)
        if shown is None:
            d.lost_after.append(f"{when}: the study is gone from `gateway status`")
        elif shown["priority"] != "stat":
            d.lost_after.append(f"{when}: `gateway status` shows it {shown['priority']}")
    by_aet = {q["calling_aet"]: q for q in status["quarantine"]}
    for r in drill.refusals:
        entry = by_aet.get(r.calling_aet)
        if entry is None:
            r.lost_after.append(f"{when}: no quarantine entry in `gateway status`")
            continue
        path = gw_dir / entry["path"]
        try:
            held = hashlib.sha256(dataset_part(path.read_bytes())).hexdigest()
        except OSError as exc:
            r.lost_after.append(f"{when}: entry shown but its file {entry['path']} is gone: {exc}")
            continue
        if held != r.dataset_sha256:
            r.lost_after.append(
                f"{when}: quarantine file {entry['path']} differs from what was sent"
            )


def gateway_backlog(gw_dir: Path) -> dict[str, dict[str, int]]:
    """Delivery states per study that is not wholly committed (for stall diagnostics)."""
    try:
        rows = ro_query(
            gw_db(gw_dir),
            "SELECT study_uid, state, count(*) FROM deliveries WHERE study_uid IN "
            "(SELECT study_uid FROM deliveries WHERE state != 'committed') GROUP BY 1, 2",
        )
        bundles = ro_query(gw_db(gw_dir), "SELECT id, study_uid, upload_url FROM bundles")
    except sqlite3.Error as exc:
        return {"(unreadable)": {str(exc): 0}}
    out: dict[str, dict[str, int]] = {}
    for study, state, n in rows:
        out.setdefault(str(study), {})[str(state)] = int(n)
    for bid, study, url in bundles:
        out.setdefault(str(study), {})[f"bundle {bid}{' uploading' if url else ''}"] = 1
    return out


def thread_stack(thread: threading.Thread, depth: int = 6) -> str:
    """Where a thread is now (its innermost frames), for stall diagnostics."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "(not running)"
    where = traceback.extract_stack(frame)[-depth:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where))


def pick_study_for_decision(gw_dir: Path, taken: set[str]) -> tuple[str, str] | None:
    """The most recent non-stat study the gateway shows (it may be receiving or sending)."""
    try:
        rows = ro_query(
            gw_db(gw_dir),
            "SELECT study_uid, priority FROM studies WHERE priority != 0 "
            "ORDER BY last_received DESC",
        )
    except sqlite3.Error:
        return None
    labels = {1: "urgent", 2: "routine"}
    for uid, prio in rows:
        if uid not in taken:
            return str(uid), labels.get(int(prio), str(prio))
    return None


def make_refused(src: Path, out: Path, kind: str) -> tuple[Path, str, str]:
    """A copy of ``src`` the gateway must refuse; returns (file, SOP UID, dataset sha256)."""
    ds = dcmread(src)
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the UID we break on purpose
        if kind == "long-series-uid":
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1.2." + "7" * 60  # 87 > 64 chars
        else:  # "missing-sop-uid": the command (from the file meta) has it, the dataset not
            del ds.SOPInstanceUID
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    data = out.read_bytes()
    return out, sop, hashlib.sha256(dataset_part(data)).hexdigest()


def send_once(path: Path, port: int, called_aet: str, calling_aet: str) -> int | None:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, port, ae_title=called_aet)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    code = status.get("Status") if status else None
    return None if code is None else int(code)


# -- the hub's side: what arrived -------------------------------------------------------------


def audit_hub(hub_dir: Path, acked: dict[str, Instance]) -> tuple[dict[str, Any], list[str]]:
    """Count what the hub holds against what was acknowledged; every problem in words."""
    problems: list[str] = []
    rows = ro_query(
        hub_db(hub_dir),
        "SELECT sop_instance_uid, study_uid, sha256, archive_ref, state FROM hub_instances",
    )
    held = Counter(r[0] for r in rows)
    hub = {r[0]: r for r in rows}
    committed = {u for u, r in hub.items() if r[4] == "committed"}
    lost = sorted(set(acked) - committed)
    extra = sorted(set(hub) - set(acked))
    twice_rows = sorted(u for u, n in held.items() if n > 1)

    archive = hub_dir / "archive"
    files = sorted(p for p in archive.rglob("*.dcm") if ".tmp" not in p.parts)
    stems = Counter(p.stem for p in files)
    twice_files = sorted(s for s, n in stems.items() if n > 1)
    corrupt = []
    for path in files:
        uid = path.stem
        if uid not in acked or uid not in hub:
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != hub[uid][2] or (
            hashlib.sha256(dataset_part(data)).hexdigest() != acked[uid].dataset_sha256
        ):
            corrupt.append(uid)

    want = expected_by_study(list(acked.values()))
    newly: Counter[str] = Counter()
    for study_uid, payload in ro_query(
        hub_db(hub_dir),
        "SELECT study_uid, payload FROM study_events WHERE kind = ?",
        ("study_received",),
    ):
        newly[study_uid] += int(json.loads(payload)["new_instances"])
    over_counted = {s: n - want.get(s, 0) for s, n in newly.items() if n > want.get(s, 0)}
    conflicts = ro_query(hub_db(hub_dir), "SELECT count(*) FROM hub_conflicts")[0][0]
    hub_quarantine = sorted(p.name for p in (hub_dir / "quarantine").iterdir())

    if lost:
        by_study = Counter(acked[u].study_uid for u in lost)
        problems.append(
            f"{len(lost)} acknowledged instances never committed at the hub "
            f"(per study: {dict(by_study)}; first: {lost[:3]})"
        )
    if twice_rows:
        problems.append(f"{len(twice_rows)} SOP UIDs have two hub rows: {twice_rows[:3]}")
    if twice_files:
        problems.append(f"{len(twice_files)} SOP UIDs archived twice: {twice_files[:3]}")
    if over_counted:
        problems.append(f"study_received events count instances twice: {over_counted}")
    if extra:
        problems.append(f"{len(extra)} instances at the hub never acknowledged: {extra[:3]}")
    if corrupt:
        problems.append(f"{len(corrupt)} archived files differ from what was sent: {corrupt[:3]}")
    if conflicts:
        problems.append(f"the hub recorded {conflicts} conflicts")
    if hub_quarantine:
        problems.append(f"the hub quarantined {len(hub_quarantine)} files: {hub_quarantine[:3]}")
    counts = {
        "at_hub": len(committed & set(acked)),
        "lost": len(lost),
        "duplicated": len(set(twice_rows) | set(twice_files)) + sum(over_counted.values()),
        "extra": len(extra),
        "corrupt": len(corrupt),
        "hub_uploads_left": len(list((hub_dir / "uploads").iterdir())),
    }
    return counts, problems


# -- the drill --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    root = tmp_path_factory.mktemp("power-loss")
    from sample_studies.generate import make_ct_series

    base = BaseSeries(
        root=root / "samples",
        ct_small=make_ct_series(root / "samples" / "ct128", 30, seed=21, matrix=128),
        ct_large=make_ct_series(root / "samples" / "ct512", 12, seed=22, matrix=512),
        cr=[],
    )
    fs = LazyFS(root / "gw-durable", root / "gw", cpus=[0])
    try:
        fs.mount()
    except FuseUnavailable as exc:  # a mount refused although FUSE looked usable
        require_peer("FUSE", False, f"the power-loss drill cannot mount lazyfs: {exc}")
    pnd = logging.getLogger("pynetdicom")
    level = pnd.level
    pnd.setLevel(logging.CRITICAL)
    old_chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # files go out byte for byte
    try:
        yield run_drill(root, fs, base)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old_chunked
        pnd.setLevel(level)
        fs.unmount()


def run_drill(root: Path, fs: LazyFS, base: BaseSeries) -> Drill:
    started = time.monotonic()
    seed = _drill_seed("power-loss drill")
    rng = random.Random(seed)
    drill = Drill(seed)
    hub_dir, gw_dir = root / "hub", fs.mountpoint

    for kind in ("small", "large", "small", "large"):
        drill.sent += base.study(kind, "power")

    hub = HubProcess(hub_dir, env=HUB_ENV)
    token = hub.add_station("drill-power")
    hub.start()
    # A bandwidth cap (no faults) so cuts land mid-upload, not only between requests.
    proxy = FaultProxy(LOOPBACK, hub.http_port).start()
    proxy.bandwidth_bps = 8e6
    gw = DrillGateway(
        gw_dir, hub_url=f"http://{LOOPBACK}:{proxy.port}", token=token, env=GATEWAY_ENV
    )
    modality = Modality(gw.dicom_port, gw.aet)

    def top_up(kind: str) -> None:
        more = base.study(kind, "power-topup")
        drill.sent.extend(more)
        modality.add(more)

    def ensure_forward_work() -> None:
        try:
            backlog = ro_query(
                gw_db(gw_dir),
                "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'bundled')",
            )[0][0]
        except sqlite3.Error:
            backlog = 1
        if backlog == 0 and modality.remaining() == 0:
            top_up("large")

    def snapshot() -> dict[str, Any]:
        try:
            bundles = ro_query(gw_db(gw_dir), "SELECT count(*), count(upload_url) FROM bundles")[0]
            states = dict(
                ro_query(gw_db(gw_dir), "SELECT state, count(*) FROM deliveries GROUP BY 1")
            )
        except sqlite3.Error:
            return {}
        return {"bundles": bundles[0], "uploading": bundles[1], **states}

    def power_cut(n: int, target: str, delay: float) -> None:
        lazy = fs.stats()
        snap = snapshot() if target != "startup" else {}
        storing = modality.in_association.is_set()
        refused_before = sum(modality.refusals.values())
        fs.power_off(after_syncs=0)  # the moment of the cut: nothing after it is durable
        gw.kill9()
        others = fs.kill_holders()  # a CLI or anything else with files there goes down too
        fs.cut()
        # A C-STORE answered between power-off and kill -9 fails with 0xA700 (EIO): expected
        # then, not counted against the gateway (the modality sends it again).
        during = sum(modality.refusals.values()) - refused_before
        drill.power_off_refusals += during
        drill.cuts.append(
            {
                "n": n,
                "target": target,
                "delay": round(delay, 3),
                "storing": storing,
                "acked": modality.acked_count(),
                "dropped_dirty_files": lazy["dirty_files"],
                "dropped_dirty_bytes": lazy["dirty_bytes"],
                "unsynced_dirs": lazy["dirs_with_unsynced_entries"],
                "other_holders_killed": len(others),
                **snap,
            }
        )
        logger.info("power cut %d: %s", n, drill.cuts[-1])

    try:
        gw.start()
        modality.start()
        modality.add(drill.sent)
        for i in range(POWER_CUTS):
            if i in PRIORITY_BEFORE:
                pick = pick_study_for_decision(gw_dir, {d.study_uid for d in drill.decisions})
                if pick is not None:
                    res = gateway_cli(gw_dir, "priority", pick[0], "stat")
                    assert res.returncode == 0 and res.stdout.strip().endswith(": stat"), (
                        f"`gateway priority {pick[0]} stat` did not answer: {res.stdout}"
                        f"{res.stderr[-1000:]}"
                    )
                    drill.decisions.append(Decision(pick[0], i, pick[1], res.stdout.strip()))
            if i in QUARANTINE_BEFORE:
                kind = "long-series-uid" if len(drill.refusals) % 2 == 0 else "missing-sop-uid"
                aet = f"QUAR_{i:02d}"
                path, sop, sha = make_refused(
                    base.ct_small[0], root / "refused" / f"{aet}.dcm", kind
                )
                status = send_once(path, gw.dicom_port, gw.aet, aet)
                drill.refusals.append(Refusal(kind, aet, sop, sha, i, status))
                assert status not in (None, 0x0000), (
                    f"the gateway did not refuse a {kind} instance: status {status}"
                )
            if i in RECEIVING_CUTS:
                if modality.remaining() < 15:
                    top_up("small")
                mark = modality.acked_count()

                def stored_more(mark: int = mark) -> bool:
                    return modality.acked_count() > mark

                wait_until(
                    stored_more,
                    60,
                    "the modality storing into the restarted gateway",
                )
                delay = rng.uniform(0.0, 0.4)
                target = "receiving"
            else:

                def upload_under_way() -> bool:
                    # Small bundles can come and go between two polls: top up whenever the
                    # gateway is idle, so there is always an upload to cut into.
                    ensure_forward_work()
                    return _uploading(gw_dir)

                try:
                    wait_until(upload_under_way, UPLOAD_WAIT_S, "a bundle upload")
                    target = "forwarding"
                except TimeoutError:
                    # Not a reason to stop the drill: cut anyway, and say what was waiting.
                    target = "forwarding-stalled"
                    drill.stalls.append(
                        f"before cut {i}: no bundle upload for {UPLOAD_WAIT_S:.0f} s; modality "
                        f"still to send {modality.remaining()} (alive {modality.is_alive()}, "
                        f"error {modality.error!r}); gateway {gateway_backlog(gw_dir)}; "
                        f"modality at {thread_stack(modality)}"
                    )
                delay = rng.uniform(0.0, 1.0)
            time.sleep(delay)  # the random moment itself, not a wait for a condition
            power_cut(i, target, delay)
            if rng.random() < STARTUP_CUT_P:
                gw.start_unready()
                when = rng.uniform(0.05, 0.8)
                time.sleep(when)
                power_cut(i, "startup", when)
            gw.start()
            check_decisions(drill, gw_dir, f"restart after cut {i}")

        expected = expected_by_study(drill.sent)

        def drained() -> bool:
            if modality.remaining() or hub_committed(hub_dir) != expected:
                return False
            open_work = ro_query(
                gw_db(gw_dir), "SELECT count(*) FROM deliveries WHERE state != 'committed'"
            )[0][0]
            return bool(open_work == 0)

        try:
            wait_until(drained, DRAIN_S, "everything acknowledged and committed", poll_s=0.25)
            drill.drained = "drained"
        except TimeoutError as exc:
            have = hub_committed(hub_dir)
            drill.drained = (
                f"{exc}; modality still to send {modality.remaining()}; hub committed "
                f"{sum(have.values())} of {sum(expected.values())} instances"
            )
        modality.stop()
        modality.join(30)
        check_decisions(drill, gw_dir, "after the drain")
        drill.acked = modality.acked
        drill.audit, drill.problems = audit_hub(hub_dir, drill.acked)
        if modality.error is not None:
            drill.problems.append(f"the modality failed: {modality.error!r}")
        if sum(modality.refusals.values()) > drill.power_off_refusals:
            drill.problems.append(
                f"the gateway refused C-STOREs while powered: {dict(modality.refusals)} "
                f"({drill.power_off_refusals} of them while the power was off)"
            )
        if drill.drained != "drained":
            drill.problems.append(
                f"did not drain: {drill.drained}; gateway {gateway_backlog(gw_dir)}"
            )
            drill.problems += [f"stalled {s}" for s in drill.stalls]
    except BaseException as exc:
        tails = "\n".join(f"--- {p.log_name} log tail ---\n{p.log_text()}" for p in (gw, hub))
        raise AssertionError(f"power-loss drill broke: {exc}\n{tails}") from exc
    finally:
        modality.stop()
        gw.stop()
        proxy.close()
        hub.stop()

    drill.seconds = time.monotonic() - started
    running = [c for c in drill.cuts if c["target"] != "startup"]
    kept_d = sum(1 for d in drill.decisions if not d.lost_after)
    kept_q = sum(1 for r in drill.refusals if not r.lost_after)
    drill.summary = (
        f"power-loss drill: {len(drill.cuts)} power cuts "
        f"({sum(1 for c in running if c['storing'])} while the modality was storing, "
        f"{sum(1 for c in running if c.get('uploading'))} with a bundle upload under way, "
        f"{len(drill.cuts) - len(running)} during start-up recovery; "
        f"{sum(c['dropped_dirty_bytes'] for c in drill.cuts) / 1e6:.1f} MB in files with unsynced "
        f"writes dropped); {len(drill.sent)} instances in {len(expected_by_study(drill.sent))} "
        f"studies, {len(drill.acked)} acknowledged, {drill.audit.get('at_hub')} at the hub, "
        f"{drill.audit.get('lost')} lost, {drill.audit.get('duplicated')} duplicated; "
        f"priority decisions kept {kept_d}/{len(drill.decisions)}, quarantine entries kept "
        f"{kept_q}/{len(drill.refusals)}; modality rounds {modality.rounds}, aborted "
        f"{modality.aborted_rounds}, {drill.power_off_refusals} C-STOREs refused while the "
        f"power was off; {len(drill.stalls)} forwarding stalls; "
        f"{drill.seconds:.0f} s (seed {seed})"
    )
    logger.warning(drill.summary)
    print("\n" + "\n".join([drill.summary, *drill.stalls]))
    return drill


# -- the verdicts -----------------------------------------------------------------------------


def _lost_text(lost_after: list[str]) -> str:
    more = f" (and still at {len(lost_after) - 1} later checks)" if len(lost_after) > 1 else ""
    return lost_after[0] + more


def _verdict(ok: bool, message: str) -> None:
    """Fail with just the message (the Drill's repr would bury it)."""
    if not ok:
        pytest.fail(message, pytrace=False)


def test_power_loss_acknowledged_instances_reach_the_hub_exactly_once(drill: Drill) -> None:
    running = [c for c in drill.cuts if c["target"] != "startup"]
    _verdict(len(running) >= 20, f"too few power cuts: {drill.summary}")
    _verdict(
        sum(1 for c in running if c["storing"]) >= 3,
        f"too few cuts while storing: {drill.summary}",
    )
    _verdict(
        sum(1 for c in running if c.get("uploading")) >= 5,
        f"too few cuts mid-upload: {drill.summary}",
    )
    _verdict(
        not drill.problems,
        "after power cuts, acknowledged instances were lost or duplicated:\n  "
        + "\n  ".join(drill.problems)
        + f"\n{drill.summary}",
    )
    _verdict(
        set(drill.acked) == {i.sop_uid for i in drill.sent},
        f"the modality never got Success for some instances: {drill.summary}",
    )


def test_power_loss_keeps_operator_priorities(drill: Drill) -> None:
    _verdict(len(drill.decisions) >= 3, f"too few priority decisions: {drill.summary}")
    lost = [
        f"study {d.study_uid} (was {d.was}), set stat before cut {d.before_cut} and the CLI "
        f"answered {d.answer!r}; then {_lost_text(d.lost_after)}"
        for d in drill.decisions
        if d.lost_after
    ]
    _verdict(
        not lost,
        f"{len(lost)} of {len(drill.decisions)} operator priority decisions were lost by a "
        "power cut (`gateway priority` answered, `gateway status` no longer shows stat):\n  "
        + "\n  ".join(lost),
    )


def test_power_loss_keeps_quarantine_entries(drill: Drill) -> None:
    _verdict(len(drill.refusals) >= 3, f"too few refused instances: {drill.summary}")
    lost = [
        f"{r.kind} instance from {r.calling_aet} (SOP {r.sop_uid}), refused with status "
        f"0x{r.status or 0:04X} before cut {r.before_cut}; then {_lost_text(r.lost_after)}"
        for r in drill.refusals
        if r.lost_after
    ]
    _verdict(
        not lost,
        f"{len(lost)} of {len(drill.refusals)} quarantine entries were lost by a power cut "
        "(the C-STORE was refused, so the gateway had promised to keep it):\n  "
        + "\n  ".join(lost),
    )
