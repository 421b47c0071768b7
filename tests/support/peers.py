"""Start real DICOM and database peers on ephemeral ports for integration tests and benchmarks.

Why real peers: the gateway has to interoperate with what sites actually run (DCMTK, Orthanc,
PostgreSQL), and several behaviours we depend on — transfer syntax selection, Nagle stalls,
association handling — only show up against the real implementations (FIELD-NOTES).

Every peer gets its own temporary directory and free ports, waits for readiness by polling
with a deadline (never a fixed sleep), runs with ``TCP_NODELAY=1`` where it is a DCMTK-based
program, and is stopped with SIGTERM then SIGKILL on exit. Each keeps a log file whose tail is
put into error messages, because "Orthanc did not start" is useless without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = [
    "PEER_MARKERS",
    "REQUIRE_PEERS_ENV",
    "OrthancServer",
    "PeerError",
    "PostgresCluster",
    "StoreSCP",
    "chromium_binary",
    "dcmtk_available",
    "dcmtk_tool",
    "echoscu",
    "find_orthanc_plugin",
    "free_port",
    "missing_peer",
    "orthanc_available",
    "orthanc_binary",
    "peers_required",
    "postgres_bin_dir",
    "require_peer",
    "storescu",
    "storescu_config",
    "wait_for_port",
]

ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
_POLL_INTERVAL_S = 0.02
_LOG_TAIL_CHARS = 4000
# DCMTK SCUs accept at most 128 presentation contexts per association (PS3.8: odd IDs 1..255).
_MAX_PRESENTATION_CONTEXTS = 128
_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_VR_LE = "1.2.840.10008.1.2"


class PeerError(RuntimeError):
    """A peer failed to start or stop; the message carries the tail of its log."""


# ---------------------------------------------------------------------------- ports & binaries

_handed_out_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port() -> int:
    """Return a TCP port that is free on all interfaces right now.

    Binds to 0.0.0.0 because Orthanc 1.10 cannot bind to one address (FIELD-NOTES), so a port
    free only on loopback is not good enough. Ports already handed out by this process are
    skipped: a peer that needs two ports (Orthanc) would otherwise sometimes get the same one
    twice, since nothing is bound until the peer starts.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
        with _handed_out_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise PeerError("could not find a free TCP port")


def wait_for_port(
    host: str,
    port: int,
    deadline_s: float,
    *,
    process: subprocess.Popen[Any] | None = None,
) -> None:
    """Poll until ``host:port`` accepts TCP connections, for at most ``deadline_s`` seconds.

    If ``process`` is given and exits meanwhile, fail at once instead of waiting out the
    deadline: a peer that died on a port clash should not cost the suite 30 s.
    """
    end = time.monotonic() + deadline_s
    last_error: OSError | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise PeerError(f"process exited with {process.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= end:
            raise TimeoutError(f"{host}:{port} not accepting after {deadline_s} s: {last_error}")
        time.sleep(_POLL_INTERVAL_S)


DCMTK_TOOLS = ("storescp", "storescu", "echoscu")


def _find_dcmtk_tool(name: str) -> str | None:
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    path = os.pathsep.join(d for d in dirs if Path(d).resolve() != venv_bin)
    return shutil.which(name, path=path)


def dcmtk_tool(name: str) -> str:
    """The DCMTK program ``name`` on PATH. pynetdicom installs scripts of the same names
    (``storescu``, ``storescp``...) in the virtualenv's bin, first on PATH when the venv is
    activated: that directory is skipped."""
    return _find_dcmtk_tool(name) or name


def dcmtk_available(*extra_tools: str) -> bool:
    """True if the DCMTK network tools these helpers drive (and ``extra_tools``) are on PATH.

    Looked up like ``dcmtk_tool``: pynetdicom's same-named scripts in the venv do not count.
    """
    return all(_find_dcmtk_tool(tool) for tool in (*DCMTK_TOOLS, *extra_tools))


def orthanc_binary() -> Path | None:
    """Locate ``Orthanc``; Debian installs it in /usr/sbin, which is not on a user's PATH."""
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    candidate = Path("/usr/sbin/Orthanc")
    return candidate if os.access(candidate, os.X_OK) else None


def orthanc_available() -> bool:
    return orthanc_binary() is not None


def postgres_bin_dir() -> Path | None:
    """Directory holding ``initdb`` and ``pg_ctl`` (newest Debian cluster version), or None.

    Debian keeps them in /usr/lib/postgresql/<ver>/bin, off PATH (FIELD-NOTES); elsewhere they
    are usually on PATH.
    """

    def usable(bin_dir: Path) -> bool:
        return all(os.access(bin_dir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "psql"))

    versions: list[tuple[int, Path]] = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        version = bin_dir.parent.name
        if version.isdigit() and usable(bin_dir):
            versions.append((int(version), bin_dir))
    if versions:
        return max(versions)[1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        bin_dir = Path(pg_ctl).resolve().parent
        if usable(bin_dir):
            return bin_dir
    return None


def find_orthanc_plugin(name: str) -> Path | None:
    """Resolve a plugin given as a path or a short name (``"dicomweb"``, ``"ServeFolders"``).

    Short names are matched case-insensitively against the shared objects in Debian's plugin
    directory, so tests can ask for "dicomweb" without knowing it is ``libOrthancDicomWeb.so``.
    """
    as_path = Path(name)
    if as_path.is_file():
        return as_path
    wanted = name.lower().removeprefix("lib").removesuffix(".so")
    if not ORTHANC_PLUGIN_DIR.is_dir():
        return None
    for candidate in sorted(ORTHANC_PLUGIN_DIR.glob("*.so*")):
        stem = candidate.name.lower().removeprefix("lib").split(".so")[0]
        if stem in (wanted, f"orthanc{wanted}"):
            return candidate
    return None


# ---------------------------------------------------------------------------- missing peers
#
# One policy for every test that needs a peer: mark it ``@pytest.mark.needs_dcmtk`` (or
# ``needs_orthanc``, ``needs_postgres``, ``needs_fuse``, ``needs_chromium``; tests/conftest.py
# checks them at collection, with ``missing_peer``), or, where availability is only known at
# run time (a fixture, a mount that fails), call ``require_peer``. A missing peer
# skips the test with the reason on a developer's machine and fails it when
# ``TELERAD_REQUIRE_PEERS=1`` (CI: .ci/run), so CI cannot go green on skipped tests.

REQUIRE_PEERS_ENV = "TELERAD_REQUIRE_PEERS"

CHROMIUM_BINARIES = ("chromium", "chromium-browser", "google-chrome", "chrome", "headless_shell")


def peers_required() -> bool:
    """True when a missing peer is an error: ``TELERAD_REQUIRE_PEERS=1``.

    Empty/unset and ``0`` mean "skip"; any other value is refused rather than guessed at, so a
    CI typo (``=true``) cannot quietly turn failures back into skips.
    """
    value = os.environ.get(REQUIRE_PEERS_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(
        f"{REQUIRE_PEERS_ENV} must be 1 (missing peers fail) or 0/unset (skip), not {value!r}"
    )


def require_peer(name: str, available: bool, reason: str) -> None:
    """Skip the running test (or fixture) if peer ``name`` is not ``available``; with
    ``TELERAD_REQUIRE_PEERS=1`` fail it instead. ``reason`` says what is missing and how to
    get it."""
    if available:
        return
    import pytest  # here, not at the top: benchmarks import this module without pytest

    message = f"{name} unavailable: {reason}"
    if peers_required():
        pytest.fail(f"{message} [{REQUIRE_PEERS_ENV}=1: a missing peer is an error]", pytrace=False)
    pytest.skip(f"{message} [set {REQUIRE_PEERS_ENV}=1 to fail instead]")


def _dcmtk_missing(*extra_tools: str) -> str | None:
    missing = [tool for tool in (*DCMTK_TOOLS, *extra_tools) if _find_dcmtk_tool(tool) is None]
    if not missing:
        return None
    return (
        f"{', '.join(missing)} not on PATH"
        " (pynetdicom's same-named venv scripts do not count; apt-get install dcmtk)"
    )


def _orthanc_missing(*plugins: str) -> str | None:
    if orthanc_binary() is None:
        return "Orthanc binary neither on PATH nor /usr/sbin/Orthanc (apt-get install orthanc)"
    missing = [name for name in plugins if find_orthanc_plugin(name) is None]
    if missing:
        return (
            f"Orthanc plugin(s) {', '.join(missing)} not in {ORTHANC_PLUGIN_DIR}"
            " (dicomweb: apt-get install orthanc-dicomweb)"
        )
    return None


def _postgres_missing() -> str | None:
    if postgres_bin_dir() is None:
        return (
            "initdb/pg_ctl/psql neither in /usr/lib/postgresql/*/bin nor on PATH"
            " (apt-get install postgresql)"
        )
    return None


def _fuse_missing() -> str | None:
    from tests.support.lazyfs import fuse_unavailable_reason  # FUSE details live with lazyfs

    return fuse_unavailable_reason()


def chromium_binary() -> str | None:
    """A Chromium/Chrome executable on PATH, or None."""
    for name in CHROMIUM_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium_missing() -> str | None:
    if chromium_binary() is None:
        return f"none of {', '.join(CHROMIUM_BINARIES)} on PATH (apt-get install chromium)"
    return None


# marker -> (peer name in messages, why-missing check taking the marker's args)
PEER_MARKERS: dict[str, tuple[str, Callable[..., str | None]]] = {
    "needs_dcmtk": ("DCMTK", _dcmtk_missing),
    "needs_orthanc": ("Orthanc", _orthanc_missing),
    "needs_postgres": ("PostgreSQL", _postgres_missing),
    "needs_fuse": ("FUSE", _fuse_missing),
    "needs_chromium": ("Chromium", _chromium_missing),
}


def missing_peer(marker: str, *args: str) -> str | None:
    """Why the peer behind ``marker`` (with the marker's args: extra DCMTK tools, Orthanc
    plugins) is not usable here, or None if it is. Checked afresh each time (cheap, and
    tests may change PATH)."""
    _name, check = PEER_MARKERS[marker]
    return check(*args)


# ---------------------------------------------------------------------------- process plumbing


def _peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for DCMTK-based programs: without TCP_NODELAY they stall ~40 ms/instance."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return text[-_LOG_TAIL_CHARS:]


def _terminate(
    process: subprocess.Popen[Any], grace_s: float, *, sweep_group: bool = False
) -> None:
    """SIGTERM the peer's process group, then SIGKILL it if it lingers (``grace_s`` 0: kill).

    Peers run in their own session so that children (``storescp --fork`` workers) go too.
    """
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    try:
        process.wait(timeout=max(grace_s, 0.1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    if sweep_group:
        # Forked workers may outlive the leader; they keep its process group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


class _Workdir:
    """A peer's scratch directory: caller-owned if given, else a temp dir removed on exit."""

    def __init__(self, given: Path | None, prefix: str) -> None:
        self.owned = given is None
        self.path = Path(tempfile.mkdtemp(prefix=prefix)) if given is None else Path(given)
        self.path.mkdir(parents=True, exist_ok=True)

    def cleanup(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------- DCMTK storescp


class StoreSCP:
    """DCMTK ``storescp`` on a free port, writing into ``out_dir``: the reference C-STORE SCP.

    Defaults accept every storage SOP class (``--promiscuous`` also takes private/unknown
    ones) and every transfer syntax DCMTK knows (``+xa``, which prefers compressed syntaxes,
    so a compressed instance arrives as it was sent). Host lookup is disabled (``-dhl``) so a
    slow resolver does not slow associations. Files get a ``.dcm`` extension.

    ``bit_preserving`` (``+B``) writes each data set exactly as received, for byte-for-byte
    comparisons; DCMTK does not allow it together with sorting into study folders.
    ``fork`` handles associations in parallel (single-process storescp serialises them).
    """

    def __init__(
        self,
        aet: str = "STORESCP",
        *,
        sort_on_study_uid: bool = False,
        bit_preserving: bool = False,
        promiscuous: bool = True,
        fork: bool = False,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 15.0,
    ) -> None:
        if bit_preserving and sort_on_study_uid:
            raise ValueError("storescp cannot sort into study folders in bit-preserving mode")
        self.aet = aet
        self.host = "127.0.0.1"
        self.port = 0
        self._sort = sort_on_study_uid
        self._bit_preserving = bit_preserving
        self._promiscuous = promiscuous
        self._fork = fork
        self._given_workdir = workdir
        self._extra_args = tuple(extra_args)
        self._startup_timeout_s = startup_timeout_s
        self._workdir: _Workdir | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.out_dir = Path()
        self.log_path = Path()

    def command(self) -> list[str]:
        cmd = [dcmtk_tool("storescp"), "-aet", self.aet, "-od", str(self.out_dir), "+xa", "-dhl"]
        cmd += ["-fe", ".dcm"]
        if self._promiscuous:
            cmd.append("--promiscuous")
        if self._sort:
            cmd += ["--sort-on-study-uid", ""]  # empty prefix: folder name is the Study UID
        if self._bit_preserving:
            cmd.append("--bit-preserving")
        if self._fork:
            cmd.append("--fork")
        cmd += [*self._extra_args, str(self.port)]
        return cmd

    def start(self) -> Self:
        self._workdir = _Workdir(self._given_workdir, "telerad-storescp-")
        self.out_dir = self._workdir.path / "received"
        self.out_dir.mkdir(exist_ok=True)
        self.log_path = self._workdir.path / "storescp.log"
        error: Exception | None = None
        for _attempt in range(3):  # a port can be taken between free_port() and bind
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    self.command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=_peer_env(),
                    start_new_session=True,
                )
            try:
                wait_for_port(self.host, self.port, self._startup_timeout_s, process=self._process)
                return self
            except PeerError as exc:  # exited early, most likely lost the port race: retry
                _terminate(self._process, 2)
                error = exc
            except TimeoutError as exc:
                _terminate(self._process, 2)
                error = exc
                break
        self._workdir.cleanup()
        raise PeerError(f"storescp did not start: {error}\n{_log_tail(self.log_path)}")

    def stop(self) -> None:
        if self._process is not None:
            _terminate(self._process, 5, sweep_group=self._fork)
            self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def received_files(self) -> list[Path]:
        """All files written so far (recursively, sorted)."""
        return sorted(p for p in self.out_dir.rglob("*.dcm") if p.is_file())

    def wait_for_files(self, count: int, deadline_s: float = 10.0) -> list[Path]:
        """Poll until at least ``count`` files exist; for pushes made by someone else
        (Orthanc C-STORE jobs) whose completion the test cannot observe directly."""
        end = time.monotonic() + deadline_s
        while True:
            files = self.received_files()
            if len(files) >= count or time.monotonic() >= end:
                if len(files) < count:
                    raise TimeoutError(
                        f"storescp got {len(files)}/{count} files in {deadline_s} s\n"
                        f"{self.log_text()}"
                    )
                return files
            time.sleep(_POLL_INTERVAL_S * 5)

    def log_text(self) -> str:
        return _log_tail(self.log_path)


# ---------------------------------------------------------------------------- DCMTK SCUs


def echoscu(
    host: str,
    port: int,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    *,
    timeout_s: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``echoscu`` (C-ECHO); check ``returncode`` yourself (0 = success)."""
    cmd = [dcmtk_tool("echoscu"), "-aec", called_aet, "-aet", calling_aet, "-to", "10"]
    cmd += [host, str(port)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_peer_env(), timeout=timeout_s, check=False
    )


def _dicom_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
    return files


def storescu_config(paths: Iterable[str | os.PathLike[str]], config_path: Path) -> str:
    """Write a DCMTK association profile proposing exactly what ``paths`` contain.

    Why: storescu proposes only uncompressed syntaxes unless told otherwise (``-x?`` picks
    one compressed syntax for all files), and then fails on every compressed file it cannot
    decompress, or decompresses the ones it can. A mixed folder (JPEG-LS + J2K + RLE +
    uncompressed) has no single right ``-x?`` option. So, as the FIELD-NOTES advise, propose
    one context per (SOP class, transfer syntax) actually present, plus an uncompressed
    fallback per SOP class so a receiver that declines a compressed syntax still gets the
    instance (storescu then decompresses if it can). Returns the profile name for ``-xf``.
    """
    from pydicom import dcmread  # local: keep module import cheap for pure-proxy users
    from pydicom.errors import InvalidDicomError

    pairs: dict[tuple[str, str], None] = {}
    for path in _dicom_files(Path(p) for p in paths):
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        except (InvalidDicomError, OSError, ValueError, AttributeError):
            continue  # storescu reports (and skips) non-DICOM files itself
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        syntax = str(meta.get("TransferSyntaxUID", ""))
        if sop_class and syntax:
            pairs[(sop_class, syntax)] = None
    if not pairs:
        raise ValueError("no readable DICOM files to send")

    syntaxes = sorted({ts for _, ts in pairs})
    sop_classes = sorted({sop for sop, _ in pairs})
    contexts = [(sop, f"TS{syntaxes.index(ts)}") for sop, ts in pairs]
    contexts += [
        (sop, "Fallback")
        for sop in sop_classes
        if (sop, _EXPLICIT_VR_LE) not in pairs or (sop, _IMPLICIT_VR_LE) not in pairs
    ]
    if len(contexts) > _MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"{len(contexts)} presentation contexts needed, at most "
            f"{_MAX_PRESENTATION_CONTEXTS} fit one association: send in smaller batches"
        )
    lines = ["[[TransferSyntaxes]]"]
    for index, ts in enumerate(syntaxes):
        lines += [f"[TS{index}]", f"TransferSyntax1 = {ts}"]
    lines += ["[Fallback]", f"TransferSyntax1 = {_EXPLICIT_VR_LE}"]
    lines += [f"TransferSyntax2 = {_IMPLICIT_VR_LE}"]
    lines += ["[[PresentationContexts]]", "[AsRecorded]"]
    for index, (sop, ts_key) in enumerate(contexts, start=1):
        lines.append(f"PresentationContext{index} = {sop}\\{ts_key}")
    lines += ["[[Profiles]]", "[AsRecorded]", "PresentationContexts = AsRecorded", ""]
    config_path.write_text("\n".join(lines))
    return "AsRecorded"


def storescu(
    paths: Iterable[str | os.PathLike[str]],
    host: str,
    port: int,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
    *,
    as_recorded: bool = True,
    timeout_s: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Push files and/or folders (recursively) with DCMTK ``storescu`` in one association.

    With ``as_recorded`` (default) the association is negotiated from the files themselves
    (see ``storescu_config``) so each instance travels in its own transfer syntax; pass
    ``as_recorded=False`` to get storescu's stock uncompressed proposal, e.g. with your own
    ``-x?`` option in ``extra_args``. ``-nh`` keeps going after a failed store so one bad file
    does not hide the rest; check ``returncode`` and ``stderr`` yourself.
    """
    path_list = [Path(p) for p in paths]
    cmd = [dcmtk_tool("storescu"), "-aec", called_aet, "-aet", calling_aet, "-nh", "-to", "10"]
    if any(p.is_dir() for p in path_list):
        cmd += ["+sd", "+r"]
    with tempfile.TemporaryDirectory(prefix="telerad-storescu-") as tmp:
        if as_recorded:
            config = Path(tmp) / "storescu.cfg"
            profile = storescu_config(path_list, config)
            cmd += ["-xf", str(config), profile]
        cmd += [*extra_args, host, str(port), *(str(p) for p in path_list)]
        return subprocess.run(
            cmd, capture_output=True, text=True, env=_peer_env(), timeout=timeout_s, check=False
        )


# ---------------------------------------------------------------------------- Orthanc


class OrthancServer:
    """The real Orthanc (Debian ``/usr/sbin/Orthanc``) with its own storage and free ports.

    HTTP is limited to localhost (``RemoteAccessAllowed: false``); authentication is off
    unless ``credentials`` is given. ``modalities`` becomes ``DicomModalities`` so Orthanc can
    C-STORE back to a test SCP, e.g. ``{"gateway": ["GATEWAY", "127.0.0.1", 11112]}``.
    ``plugins`` are paths or short names resolved by ``find_orthanc_plugin``; none are loaded
    by default. ``extra_config`` is merged last and wins.

    Startup takes ~0.1-0.5 s (a fresh SQLite index); readiness is ``GET /system`` answering
    200, which Orthanc only does after its DICOM server is listening. A graceful stop takes
    ~3.5 s (its HTTP and DICOM servers notice the signal on internal polling intervals);
    ``graceful_stop=False`` kills it at once, fine when its storage is thrown away anyway.
    """

    def __init__(
        self,
        aet: str = "ORTHANC",
        *,
        modalities: Mapping[str, Any] | None = None,
        stable_age_s: int = 2,
        plugins: Sequence[str] = (),
        credentials: tuple[str, str] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        startup_timeout_s: float = 60.0,
        graceful_stop: bool = True,
    ) -> None:
        self.aet = aet
        self.host = "127.0.0.1"
        self._graceful_stop = graceful_stop
        self.http_port = 0
        self.dicom_port = 0
        self.auth = credentials
        self._modalities = dict(modalities or {})
        self._stable_age_s = stable_age_s
        self._plugins = tuple(plugins)
        self._plugin_paths: list[Path] = []
        self._extra_config = dict(extra_config or {})
        self._given_workdir = workdir
        self._startup_timeout_s = startup_timeout_s
        self._workdir: _Workdir | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.config_path = Path()
        self.log_path = Path()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is (or will be) started with."""
        assert self._workdir is not None
        user, password = self.auth if self.auth else (None, None)
        config: dict[str, Any] = {
            "Name": f"telerad-test-{self.aet}",
            "StorageDirectory": str(self._workdir.path / "storage"),
            "IndexDirectory": str(self._workdir.path / "index"),
            "StorageCompression": False,
            "Plugins": [str(path) for path in self._plugin_paths],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.auth is not None,
            "RegisteredUsers": {user: password} if user else {},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": self._modalities,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StableAge": self._stable_age_s,
            "SaveJobs": False,
        }
        config.update(self._extra_config)
        return config

    def start(self) -> Self:
        binary = orthanc_binary()
        if binary is None:
            raise PeerError("Orthanc binary not found (apt-get install orthanc)")
        self._plugin_paths = []
        for name in self._plugins:
            found = find_orthanc_plugin(name)
            if found is None:
                raise PeerError(f"Orthanc plugin {name!r} not found in {ORTHANC_PLUGIN_DIR}")
            self._plugin_paths.append(found)
        self._workdir = _Workdir(self._given_workdir, "telerad-orthanc-")
        self.config_path = self._workdir.path / "orthanc.json"
        self.log_path = self._workdir.path / "orthanc.log"
        error: Exception | None = None
        for _attempt in range(3):  # ports can be taken between free_port() and bind
            self.http_port, self.dicom_port = free_port(), free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [str(binary), str(self.config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=_peer_env(),
                    start_new_session=True,
                    cwd=self._workdir.path,
                )
            try:
                self._wait_ready()
                return self
            except PeerError as exc:  # exited early, most likely lost the port race: retry
                _terminate(self._process, 5)
                error = exc
            except TimeoutError as exc:
                _terminate(self._process, 5)
                error = exc
                break
        self._workdir.cleanup()
        raise PeerError(f"Orthanc did not start: {error}\n{_log_tail(self.log_path)}")

    def _wait_ready(self) -> None:
        assert self._process is not None
        end = time.monotonic() + self._startup_timeout_s
        last: object = None
        with httpx.Client(auth=self.auth, timeout=2.0) as client:
            while True:
                if self._process.poll() is not None:
                    raise PeerError(f"Orthanc exited with {self._process.returncode}")
                try:
                    response = client.get(f"{self.url}/system")
                    if response.status_code == 200:
                        return
                    last = response.status_code
                except httpx.HTTPError as exc:
                    last = exc
                if time.monotonic() >= end:
                    raise TimeoutError(f"Orthanc /system not ready: {last}")
                time.sleep(_POLL_INTERVAL_S * 2.5)

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client bound to this instance's REST API (caller closes it)."""
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30.0, **kwargs)

    def log_text(self) -> str:
        return _log_tail(self.log_path)

    def stop(self) -> None:
        if self._process is not None:
            _terminate(self._process, 15 if self._graceful_stop else 0)
            self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------- PostgreSQL

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresCluster:
    """A throw-away PostgreSQL cluster on a free loopback port, one per test session or test.

    Follows FIELD-NOTES: ``initdb`` refuses to run as root, so as root the cluster directory
    is owned by ``postgres`` and the server tools run through ``runuser``. Trust auth on
    127.0.0.1 only, unix socket in the cluster's own directory (never /var/run/postgresql).
    ``durable=False`` (default) turns off fsync: it only matters for an OS crash, which no test
    simulates, and it makes schema setup several times faster.
    """

    def __init__(self, *, durable: bool = False, startup_timeout_s: float = 60.0) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise PeerError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bin_dir = bin_dir
        self.host = "127.0.0.1"
        self.port = 0
        self._durable = durable
        self._startup_timeout_s = startup_timeout_s
        self._run_as = "postgres" if os.geteuid() == 0 else None
        self.base_dir = Path()
        self.data_dir = Path()
        self.log_path = Path()
        self._started = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default ``postgres`` database."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{name}"

    def _server_cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", self._run_as, "--", *cmd] if self._run_as else cmd

    def _run(self, cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=self.base_dir
        )
        if result.returncode != 0:
            raise PeerError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"\n{_log_tail(self.log_path)}"
            )
        return result

    def start(self) -> Self:
        # /tmp rather than pytest's tmp_path: the postgres user must be able to traverse it.
        self.base_dir = Path(tempfile.mkdtemp(prefix="telerad-pg-"))
        self.data_dir = self.base_dir / "db"
        self.log_path = self.base_dir / "postgres.log"
        if self._run_as:
            account = pwd.getpwnam(self._run_as)
            os.chown(self.base_dir, account.pw_uid, account.pw_gid)
        try:
            self._run(
                self._server_cmd(
                    "initdb",
                    "-D",
                    str(self.data_dir),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ),
                timeout_s=self._startup_timeout_s,
            )
            for _attempt in range(3):
                self.port = free_port()
                options = f"-p {self.port} -k {self.base_dir} -c listen_addresses=127.0.0.1"
                if not self._durable:
                    options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                try:
                    self._run(
                        self._server_cmd(
                            "pg_ctl",
                            "-D",
                            str(self.data_dir),
                            "-o",
                            options,
                            "-l",
                            str(self.log_path),
                            "-t",
                            str(int(self._startup_timeout_s)),
                            "-w",
                            "start",
                        ),
                        timeout_s=self._startup_timeout_s + 10,
                    )
                except PeerError:
                    if "already in use" in _log_tail(self.log_path):
                        continue  # lost the port race; try another
                    raise
                self._started = True
                return self
            raise PeerError(f"PostgreSQL found no free port\n{_log_tail(self.log_path)}")
        except BaseException:
            self._cleanup()
            raise

    def psql(
        self, sql: str, database: str = "postgres", *, timeout_s: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run SQL through ``psql`` over TCP (unaligned, tuples only); raises on error."""
        cmd = [
            str(self.bin_dir / "psql"),
            "-X",
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        ]
        return self._run(cmd, timeout_s)

    def create_database(self, name: str) -> str:
        """Create a database (one per test keeps tests independent) and return its URL."""
        if not _DB_NAME.match(name):
            raise ValueError(f"not a plain SQL identifier: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def stop(self) -> None:
        try:
            if self._started:
                self._run(
                    self._server_cmd(
                        "pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"
                    ),
                    timeout_s=60,
                )
                self._started = False
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.base_dir != Path():
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_text(self) -> str:
        return _log_tail(self.log_path)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
