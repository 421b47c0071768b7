"""A fault-injecting TCP proxy that stands in for a bad link between a station and the hub.

The kernel here has no ``netem`` qdisc (see FIELD-NOTES), so latency, resets and outages are
simulated in user space: every connection accepted on ``127.0.0.1:<port>`` is relayed to the
target through a model of a shared link.

Link model, per direction (client->target is "up", target->client is "down"):

* **Bandwidth** is one token bucket per direction shared by every connection, like a real
  access link that all associations from a station have to share. The bucket runs on a
  virtual clock (a sender reserves bytes and waits until they have been "serialised"), so
  over- and under-sleeping corrects itself and long transfers stay within a few percent of
  ``bytes * 8 / bandwidth_bps``.
* **Latency** is a delay line: each chunk is stamped with ``arrival + latency_s`` when it
  leaves the bucket and written out no earlier than that. Reading keeps going meanwhile, so
  latency adds delay without capping throughput (up to ``buffer_chunks`` chunks in flight per
  connection and direction, the analogue of a router queue).
* **Resets** (``reset_every_s``) and **outages** (``down``/``outage()``) close sockets with
  ``SO_LINGER`` 0, so both peers see a TCP RST, the way a NAT timeout or a flapping VPN looks to
  a DICOM association. During an outage new connections are accepted and reset at once: the
  client sees its association fail immediately rather than time out, and the listening port
  stays the same for the whole test.

Everything runs on an asyncio loop in one background thread; settings may be changed from any
thread while traffic flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

__all__ = ["FaultProxy"]

_MAX_CHUNK = 64 * 1024
_MIN_CHUNK = 1024
# Bucket granularity: chunks carry at most this much serialisation time, so a shaped link
# delivers bytes smoothly instead of in bursts that would distort latency measurements.
_CHUNK_SECONDS = 0.02
_TICK_S = 0.01
_CONNECT_TIMEOUT_S = 10.0


def _set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: DICOM peers stall ~40 ms per PDU exchange with it (FIELD-NOTES)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close_with_rst(sock: socket.socket) -> None:
    """Close so that the peer gets a RST, not a FIN: that is what a broken link looks like."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _TokenBucket:
    """Shared serialisation clock for one direction of the link.

    ``reserve(n)`` books ``n`` bytes and returns how long the caller must wait before they are
    "on the wire". The balance may go negative (debt), which queues later senders behind
    earlier ones across all connections, so concurrent associations share the rate.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rate_Bps: float | None = None
        self._tokens = 0.0
        self._burst = 0.0
        self._last = time.monotonic()

    def set_rate(self, bandwidth_bps: float | None) -> None:
        with self._lock:
            if bandwidth_bps is None:
                self._rate_Bps = None
                return
            if bandwidth_bps <= 0:
                raise ValueError("bandwidth_bps must be positive or None")
            self._rate_Bps = bandwidth_bps / 8.0
            self._burst = self.chunk_size_locked()
            self._tokens = min(self._tokens, self._burst)
            self._last = time.monotonic()

    def chunk_size_locked(self) -> int:
        if self._rate_Bps is None:
            return _MAX_CHUNK
        return int(min(_MAX_CHUNK, max(_MIN_CHUNK, self._rate_Bps * _CHUNK_SECONDS)))

    def chunk_size(self) -> int:
        with self._lock:
            return self.chunk_size_locked()

    def reserve(self, nbytes: int) -> float:
        with self._lock:
            if self._rate_Bps is None:
                return 0.0
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate_Bps)
            self._last = now
            self._tokens -= nbytes
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self._rate_Bps


@dataclass(eq=False)
class _Link:
    """One relayed client connection and its upstream socket."""

    client: socket.socket
    upstream: socket.socket | None = None
    task: asyncio.Task[None] | None = None
    reset: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Relay TCP connections to ``target_host:target_port`` through a degradable link.

    Use as a context manager; connect clients to ``127.0.0.1:proxy.port``. Settings
    (``bandwidth_bps``, ``latency_s``, ``reset_every_s``, ``down``) can be changed at any time
    from any thread and take effect for data read afterwards.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        buffer_chunks: int = 256,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._buffer_chunks = buffer_chunks

        self._lock = threading.Lock()
        self._up = _TokenBucket()
        self._down_bucket = _TokenBucket()
        self._bandwidth_bps: float | None = None
        self._latency_s = 0.0
        self._reset_every_s: float | None = None
        self._next_reset = 0.0
        self._down = False
        self._outage_timer: threading.Timer | None = None

        self._bytes_up = 0
        self._bytes_down = 0
        self._connections = 0
        self._resets = 0
        self._refused = 0

        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._links: set[_Link] = set()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Bind in the caller's thread (so ``port`` is known and bind errors surface here)."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self._listen_port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy-{self.port}", daemon=True
        )
        self._thread.start()
        self._started.wait()
        if self._startup_error is not None:
            raise RuntimeError("FaultProxy failed to start") from self._startup_error
        return self

    def close(self) -> None:
        """Stop accepting, reset every relayed connection and join the loop thread."""
        with self._lock:
            timer, self._outage_timer = self._outage_timer, None
        if timer is not None:
            timer.cancel()
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout=10)
            if thread.is_alive():
                logger.warning("faultproxy thread for port %s did not stop", self.port)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("FaultProxy not started")
        return int(self._listener.getsockname()[1])

    # ------------------------------------------------------------------ settings

    @property
    def bandwidth_bps(self) -> float | None:
        """Link rate in bits per second for each direction; None means unlimited."""
        return self._bandwidth_bps

    @bandwidth_bps.setter
    def bandwidth_bps(self, value: float | None) -> None:
        with self._lock:
            self._up.set_rate(value)
            self._down_bucket.set_rate(value)
            self._bandwidth_bps = value

    @property
    def latency_s(self) -> float:
        """One-way delay added in each direction (round trip = 2x)."""
        return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        if value < 0:
            raise ValueError("latency_s must be >= 0")
        with self._lock:
            self._latency_s = float(value)

    @property
    def reset_every_s(self) -> float | None:
        """Reset all relayed connections every this many seconds; None disables."""
        return self._reset_every_s

    @reset_every_s.setter
    def reset_every_s(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError("reset_every_s must be positive or None")
        with self._lock:
            self._reset_every_s = value
            self._next_reset = time.monotonic() + value if value is not None else 0.0

    @property
    def down(self) -> bool:
        """True during an outage: live connections are reset, new ones reset on accept."""
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        with self._lock:
            self._down = bool(value)
        if value:
            self._call_in_loop(self._reset_all)

    def outage(self, seconds: float) -> None:
        """Take the link down now and bring it back after ``seconds``, without blocking."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        timer = threading.Timer(seconds, self._end_outage)
        timer.daemon = True
        with self._lock:
            previous, self._outage_timer = self._outage_timer, timer
        if previous is not None:
            previous.cancel()
        self.down = True
        timer.start()

    def _end_outage(self) -> None:
        with self._lock:
            self._outage_timer = None
        self.down = False

    # ------------------------------------------------------------------ counters

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the target (client -> target)."""
        return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes delivered to clients (target -> client)."""
        return self._bytes_down

    @property
    def connections(self) -> int:
        """Connections accepted and relayed (refused ones are counted in ``refused``)."""
        return self._connections

    @property
    def resets(self) -> int:
        """Relayed connections the proxy killed with a RST (periodic resets and outages)."""
        return self._resets

    @property
    def refused(self) -> int:
        """Connections accepted during an outage and reset at once."""
        return self._refused

    @property
    def active_connections(self) -> int:
        return len(self._links)

    # ------------------------------------------------------------------ loop thread

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop already shut down
            loop.call_soon_threadsafe(fn)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to start() or logged
            if not self._started.is_set():
                self._startup_error = exc
                self._started.set()
            else:
                logger.exception("faultproxy loop crashed")

    async def _main(self) -> None:
        assert self._listener is not None
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        accept_task = asyncio.create_task(self._accept_loop(self._listener))
        tick_task = asyncio.create_task(self._ticker())
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            accept_task.cancel()
            tick_task.cancel()
            await asyncio.gather(accept_task, tick_task, return_exceptions=True)
            self._listener.close()
            links = list(self._links)
            for link in links:
                self._reset_link(link, count=False)
            pending = [link.task for link in links if link.task is not None]
            await asyncio.gather(*pending, return_exceptions=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _addr = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: keep serving
                logger.warning("faultproxy accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            client.setblocking(False)
            _set_nodelay(client)
            if self._down:
                self._refused += 1
                _close_with_rst(client)
                continue
            self._connections += 1
            link = _Link(client=client)
            self._links.add(link)
            link.task = asyncio.create_task(self._serve(link))

    async def _ticker(self) -> None:
        """Drive periodic resets from the loop so they never race with the pumps."""
        while True:
            await asyncio.sleep(_TICK_S)
            with self._lock:
                period = self._reset_every_s
                due = period is not None and time.monotonic() >= self._next_reset
                if due and period is not None:
                    self._next_reset = time.monotonic() + period
            if due:
                self._reset_all()

    def _reset_all(self) -> None:
        for link in list(self._links):
            self._reset_link(link)

    def _reset_link(self, link: _Link, *, count: bool = True) -> None:
        if link.reset:
            return
        link.reset = True
        if count:
            self._resets += 1
        if link.task is not None:
            link.task.cancel()

    async def _serve(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            _set_nodelay(upstream)
            link.upstream = upstream
            try:
                await asyncio.wait_for(
                    loop.sock_connect(upstream, (self.target_host, self.target_port)),
                    _CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as exc:
                logger.info(
                    "faultproxy: target %s:%s unreachable: %s",
                    self.target_host,
                    self.target_port,
                    exc,
                )
                link.reset = True
                return
            link.pumps = [
                asyncio.create_task(self._pump(link.client, upstream, self._up, "up")),
                asyncio.create_task(self._pump(upstream, link.client, self._down_bucket, "down")),
            ]
            done, _ = await asyncio.wait(link.pumps, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    link.reset = True  # one side broke: pass the break on to the other
        finally:
            for task in link.pumps:
                task.cancel()
            # Wait for the pumps to drop their selector registrations before the sockets are
            # closed, so a recycled file descriptor can never be touched by a stale callback.
            await asyncio.gather(*link.pumps, return_exceptions=True)
            for sock in (link.client, link.upstream):
                if sock is None:
                    continue
                if link.reset:
                    _close_with_rst(sock)
                else:
                    sock.close()
            self._links.discard(link)

    async def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        bucket: _TokenBucket,
        direction: str,
    ) -> None:
        """Relay one direction; returns on a clean EOF, raises if either socket breaks."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=self._buffer_chunks)
        reader = asyncio.create_task(self._read_side(src, queue, bucket))
        writer = asyncio.create_task(self._write_side(dst, queue, direction))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
        finally:
            reader.cancel()
            writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read_side(
        self, src: socket.socket, queue: asyncio.Queue[tuple[float, bytes]], bucket: _TokenBucket
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(src, bucket.chunk_size())
            if data:
                # Serialisation first (the sender is held back, as on a real slow link), then
                # the propagation delay is attached as a due time for the writer.
                wait = bucket.reserve(len(data))
                if wait > 0:
                    await asyncio.sleep(wait)
            # b"" (end of stream) travels through the delay line too, so the FIN is not
            # delivered ahead of the data in front of it.
            await queue.put((loop.time() + self._latency_s, data))
            if not data:
                return

    async def _write_side(
        self, dst: socket.socket, queue: asyncio.Queue[tuple[float, bytes]], direction: str
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)  # half-close: pass the FIN on
                return
            await loop.sock_sendall(dst, data)
            if direction == "up":
                self._bytes_up += len(data)
            else:
                self._bytes_down += len(data)
