"""One client connection: its protocol state, reader and writer tasks, and calls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup

from remote_exec.exceptions import (
    ConnectionLostError,
    ProtocolError,
    RemoteExecError,
    exception_type_name,
)
from remote_exec.framing import pack_frames
from remote_exec.invocations import new_session
from remote_exec.messages import Call, Cancel, Close, Credit, Message
from remote_exec.protocol import Decoded, FramePieces, Limits, RpcConnection, Side
from remote_exec.registry import InstanceRegistry
from remote_exec.runtime.backend import threadsafe_call_soon
from remote_exec.runtime.calls import RUNNING, Runner, RuntimeCall, StreamCall, runner_in
from remote_exec.runtime.instances import Instance
from remote_exec.runtime.transport import FrameTransport

__all__ = ["DEFAULT_MAX_OUTGOING_BYTES", "Connection", "OpCall"]

logger = logging.getLogger("remote_exec.server")

DECODE_IN_THREAD = 64 * 1024
"""Messages longer than this (bytes) are decoded in a worker thread.

Decoding costs up to about a microsecond per byte of body (a body of empty
arrays, built twice): a message this long stalls the event loop 50 ms at
most; a longer one is parsed and built off it, so other clients are served
meanwhile. A smaller one is decoded where it arrives: no thread hop.
"""
DECODE_THREADS = 2
"""Large messages decoded at once, all connections together (per event loop):
decoding is CPU work, and each decode holds up to ``Limits.max_elements``
values, parsed then built (about 150 MB at the default); past it, readers
wait their turn."""
_DECODERS: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "remote_exec.server.decoders"
)


DEFAULT_MAX_OUTGOING_BYTES = 32 * 1024 * 1024
"""Bytes of replies one connection may have waiting to be written before its
reader stops taking new messages from it (back-pressure), until the client
has read enough of them (the daemon's ``--max-outgoing-bytes``). A transport
may carry its own bound as ``max_outgoing_bytes``.

Without it, a client that never reads its replies grew the daemon without
limit: the calls-per-connection cap does not help, since a reply that is
queued frees its call's place.
"""


def _size(pieces: FramePieces) -> int:
    return sum(piece.nbytes if isinstance(piece, memoryview) else len(piece) for piece in pieces)


def _decoders() -> anyio.CapacityLimiter:
    """The event loop's limiter of large decodes (``DECODE_THREADS``)."""
    try:
        return _DECODERS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(DECODE_THREADS)
        _DECODERS.set(limiter)
        return limiter


class Connection:
    """One client connection: its protocol state, reader, writer and calls."""

    def __init__(
        self,
        transport: FrameTransport,
        peer: str,
        *,
        registry: InstanceRegistry,
        limits: Limits,
        close_grace: float,
        on_call: Callable[[Connection, Call], None],
    ) -> None:
        self.transport = transport
        self.peer = peer
        self.rpc = RpcConnection(Side.SERVER, registry, limits=limits)
        self.close_grace = close_grace
        self._on_call = on_call
        self.call_soon = threadsafe_call_soon()
        self.calls: dict[int, RuntimeCall] = {}
        # The prefix of the ids of this connection's invocations: the client's
        # own once it says hello, so it knows each id before sending the call.
        self.session = new_session()
        self.runners: dict[Instance, Runner] = {}
        self.held: set[str] = set()  # instances this connection created (max_instances)
        self.creating = 0  # ... and is creating right now
        self.tg: TaskGroup | None = None
        self.alive = True  # False once the connection is going away: nothing more is sent
        self.reason = "the connection closed"
        self.finished = anyio.Event()
        self.reader_scope = anyio.CancelScope()
        # The backend's own Event class: ``anyio.Event()`` looks the backend up
        # on every call (2 µs), and the writer makes one per burst of replies.
        self._new_event: Callable[[], anyio.Event] = type(anyio.Event())
        self._wakeup = self._new_event()
        self._flushes: dict[StreamCall, None] = {}  # streams with buffered items, in order
        self._sending = False
        self._writer_failed = False
        # Back-pressure (``DEFAULT_MAX_OUTGOING_BYTES``): frames queued while the
        # writer was busy, taken out of the protocol so that they are counted;
        # ``outgoing_bytes`` counts them and the batch being written.
        bound = getattr(transport, "max_outgoing_bytes", None)
        self.max_outgoing_bytes: int = bound or DEFAULT_MAX_OUTGOING_BYTES
        self.outgoing_bytes = 0
        self._backlog: list[FramePieces] = []
        self._room: anyio.Event | None = None  # the reader waits on it past the bound
        self.held_back = 0  # times the reader waited for the client to read
        self._idle_waiters: list[anyio.Event] = []
        self._waiting: set[RuntimeCall] | None = None  # while winding down
        self._drained = anyio.Event()

    def __repr__(self) -> str:
        return f"<connection {self.peer or id(self)}>"

    # -- sending (all no-ops once the connection is going away) --------------------
    def schedule_flush(self, stream: StreamCall) -> None:
        self._flushes[stream] = None
        self._wakeup.set()

    def credit(self, sid: int) -> int:
        """Items to produce now on stream ``sid``: within its credit and its
        bytes in flight (``RpcConnection.allowance``)."""
        return self.rpc.allowance(sid)

    def _usable(self, sid: int) -> bool:
        return self.alive and not self.rpc.closed and self.rpc.is_open(sid)

    def reply(self, sid: int, value: Any) -> None:
        if not self._usable(sid):
            return
        try:
            self.rpc.send_result(sid, value)
        except Exception as exc:  # noqa: BLE001 - not encodable, or too large: the caller gets why
            self.fail(sid, exc)
            return
        self._wakeup.set()

    def fail(self, sid: int, exc: BaseException) -> None:
        if not self._usable(sid):
            return
        # The client gets the traceback without this machine's paths
        # (``client_traceback``); the log keeps the full one, at DEBUG: any
        # client can make calls fail, as often as it likes.
        logger.debug(
            "call %d from %s failed with %s",
            sid,
            self.peer or "(unnamed peer)",
            exception_type_name(exc),
            exc_info=exc,
        )
        try:
            self.rpc.send_failure(sid, exc)
        except Exception:  # noqa: BLE001 - unprintable, or over the size cap
            fallback = RemoteExecError(
                f"{exception_type_name(exc)} (its message could not be sent)"
            )
            try:
                self.rpc.send_failure(sid, fallback)
            except Exception:
                logger.exception("could not send a failure for call %d", sid)
                return
        self._wakeup.set()

    def end_stream(self, sid: int) -> None:
        if not self._usable(sid):
            return
        self.rpc.send_stream_end(sid)
        self._wakeup.set()

    def send_items(self, sid: int, items: list[Any]) -> None:
        if not self._usable(sid):
            return
        self.rpc.send_items(sid, items)
        self._wakeup.set()

    def forget(self, call: RuntimeCall) -> None:
        """``call``'s work is over."""
        if self.calls.get(call.sid) is call:
            del self.calls[call.sid]
        waiting = self._waiting
        if waiting is not None:
            waiting.discard(call)
            if not waiting:
                self._drained.set()

    # -- the writer -------------------------------------------------------------
    async def write_loop(self) -> None:
        rpc = self.rpc
        try:
            while True:
                if self._flushes:
                    await self._settle()
                    streams = list(self._flushes)
                    self._flushes.clear()
                    for stream in streams:
                        stream.flush()
                if not (self._backlog or rpc.has_data_to_send):
                    waiters, self._idle_waiters = self._idle_waiters, []
                    for waiter in waiters:
                        waiter.set()
                    self._wakeup = self._new_event()
                    await self._wakeup.wait()
                    continue
                self._sending = True
                await self._send_queued()
                self._sending = False
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if not isinstance(exc, ConnectionLostError):
                logger.exception("sending to %r failed", self)
            self._writer_failed = True
            self.alive = False
            self.reason = f"sending failed: {exc}"
            self.reader_scope.cancel()
            self._backlog = []  # never to be sent: freed now
            self.outgoing_bytes = 0
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.set()

    async def _send_queued(self) -> None:
        """Replies queued together travel together: one message, one write.

        A function of its own, so that the last message sent (maybe a large
        result) is not kept alive by the writer's locals while it waits.
        """
        rpc = self.rpc
        frames, self._backlog = self._backlog, []
        if rpc.has_data_to_send:
            fresh = rpc.data_to_send()
            self.outgoing_bytes += sum(map(_size, fresh))
            frames += fresh
        messages = pack_frames(frames, rpc.limits.max_message_size)
        del frames
        messages.reverse()
        while messages:
            message = messages.pop()  # each freed once written
            await self.transport.send_frame(message)
            self.outgoing_bytes -= _size(message)
            if self._room is not None and self.outgoing_bytes <= self.max_outgoing_bytes:
                self._room.set()

    async def _settle(self) -> None:
        """Let producers that are making progress finish their burst first.

        A producer that added items during one scheduling round is still going
        (an async generator between checkpoints, a thread in a loop); one that
        did not is waiting for something. Items ready together then travel in
        one frame. Other frames waiting to go out end the wait, and so does
        the end of a step (a step never produces more than its credit).
        """
        sizes = [len(stream.buffer) for stream in self._flushes]
        for _ in range(self.rpc.limits.max_credit):
            await anyio.lowlevel.checkpoint()
            if self._backlog or self.rpc.has_data_to_send:
                return
            now = [len(stream.buffer) for stream in self._flushes]
            if now == sizes:
                return
            sizes = now

    async def wait_sent(self) -> None:
        """Until everything queued so far was written."""
        if self._writer_failed or not (
            self._sending or self._backlog or self.rpc.has_data_to_send or self._flushes
        ):
            return
        waiter = anyio.Event()
        self._idle_waiters.append(waiter)
        self._wakeup.set()
        await waiter.wait()

    # -- the reader -------------------------------------------------------------
    async def read_loop(self) -> None:
        rpc, transport = self.rpc, self.transport
        with self.reader_scope:
            try:
                while True:
                    if rpc.has_data_to_send:
                        self._count_queued()
                    if self.outgoing_bytes > self.max_outgoing_bytes:
                        await self._wait_for_room()
                    frame = await transport.receive_frame()
                    if len(frame) > DECODE_IN_THREAD:
                        await self._handle_large_frame(frame)
                    else:
                        self._handle_frame(frame)
                    del frame  # not kept (maybe large) while the next one is awaited
                    if not self.alive:
                        return
                    if rpc.has_data_to_send:  # e.g. a TooManyCalls reply the protocol made
                        self._wakeup.set()
            except ConnectionLostError:
                self.reason = "the client went away"
            except ProtocolError as exc:  # FrameError too: drop this connection only
                logger.warning("protocol error from %r, closing it: %s", self, exc)
                self.reason = f"protocol error: {exc}"
                try:
                    rpc.send_close(f"protocol error: {exc}")
                except Exception:  # noqa: BLE001, S110 - the connection is being dropped anyway
                    pass
                self._wakeup.set()
            except Exception as exc:  # a transport failing in an unexpected way
                logger.exception("receiving from %r failed", self)
                self.reason = f"receiving failed: {exc!r}"
        self.alive = False

    def _count_queued(self) -> None:
        """Take what the protocol queued while the writer was busy into the
        backlog, so that it counts towards ``outgoing_bytes``."""
        if not self._sending:
            return  # the writer takes (and counts) it itself, at once
        fresh = self.rpc.data_to_send()
        self.outgoing_bytes += sum(map(_size, fresh))
        self._backlog += fresh

    async def _wait_for_room(self) -> None:
        """Back-pressure: read nothing more from this client while more than
        ``max_outgoing_bytes`` wait to be written to it, so that a client that
        reads its replies slowly, or never, cannot make the daemon grow."""
        if not self.held_back:
            logger.info(
                "%r reads its replies slower than it sends calls: %d bytes wait to be "
                "written to it; reading from it again once it has read them",
                self,
                self.outgoing_bytes,
            )
        self.held_back += 1
        while self.outgoing_bytes > self.max_outgoing_bytes and not self._writer_failed:
            self._room = self._new_event()
            try:
                await self._room.wait()
            finally:
                self._room = None
            if self.rpc.has_data_to_send:
                self._count_queued()

    def _handle_frame(self, frame: bytes | bytearray | memoryview) -> None:
        """Act on one frame; its own function, so that no local keeps a frame
        (maybe large) or its messages alive while the reader waits for the next."""
        rpc = self.rpc
        rpc.receive_frame(frame)
        for message in rpc.events_received():
            try:
                _HANDLERS[type(message)](self, message)
            except Exception:  # a bug must not take the connection down
                logger.exception("could not handle %r from %r", message, self)

    async def _handle_large_frame(self, frame: bytes | bytearray | memoryview) -> None:
        """Act on a large message: decoded in a worker thread (``DECODE_IN_THREAD``),
        then received on the loop, one bounded group of its frames at a time.

        ``RpcConnection.decode`` only reads what does not change; the state
        moves in ``receive_decoded``, here on the loop, in order: the writer
        and the calls use the connection meanwhile, and nothing else is read
        from it until the message is done.
        """
        rpc = self.rpc
        start: int | None = 0
        while start is not None:
            decoded = await anyio.to_thread.run_sync(rpc.decode, frame, start, limiter=_decoders())
            start = decoded.rest
            self._handle_decoded(decoded)
            del decoded  # its frames go now, not after the next group is decoded
            if not self.alive:
                return
            if rpc.has_data_to_send:
                self._wakeup.set()

    def _handle_decoded(self, decoded: Decoded) -> None:
        """``_handle_frame`` for frames ``RpcConnection.decode`` decoded."""
        rpc = self.rpc
        rpc.receive_decoded(decoded)
        for message in rpc.events_received():
            try:
                _HANDLERS[type(message)](self, message)
            except Exception:  # a bug must not take the connection down
                logger.exception("could not handle %r from %r", message, self)

    def on_call(self, message: Message) -> None:
        assert isinstance(message, Call)
        try:
            self._on_call(self, message)
        except Exception as exc:
            logger.exception("could not dispatch call %d", message.stream_id)
            self.calls.pop(message.stream_id, None)
            self.fail(message.stream_id, exc)

    def on_credit(self, message: Message) -> None:
        call = self.calls.get(message.stream_id)
        if call is not None:
            call.on_credit()

    def on_cancel(self, message: Message) -> None:
        call = self.calls.get(message.stream_id)
        if call is not None:
            call.on_cancel()

    def on_close(self, message: Message) -> None:
        assert isinstance(message, Close)
        self.alive = False
        self.reason = f"the client closed it ({message.reason or 'no reason given'})"

    # -- going away ---------------------------------------------------------------
    def runner_for(self, instance: Instance) -> Runner:
        assert self.tg is not None
        return runner_in(self.runners, instance, self.tg)

    def shutdown(self, reason: str) -> None:
        """Server shutdown: fail every open call, say goodbye, stop reading."""
        if self.alive:
            error = ConnectionLostError(reason)
            for sid in self.rpc.open_ids():
                self.fail(sid, error)
            try:
                self.rpc.send_close(reason)
            except ProtocolError:
                pass
            self._wakeup.set()
        self.alive = False
        self.reason = reason
        self.reader_scope.cancel()

    async def wind_down(self) -> None:
        """Cancel what this connection started and close its generators (bounded)."""
        self.alive = False
        waiting: set[RuntimeCall] = set()
        for call in list(self.calls.values()):
            try:
                if call.abandon() and self.calls.get(call.sid) is call:
                    waiting.add(call)
            except Exception:
                logger.exception("could not abandon %r", call)
        grace = self.close_grace
        if waiting:
            self._waiting = waiting
            with anyio.move_on_after(grace):
                await self._drained.wait()
        with anyio.move_on_after(grace):  # e.g. the Close after a protocol error
            await self.wait_sent()

    def release(self) -> None:
        self.alive = False
        for runner in list(self.runners.values()):
            runner.alive = False
        for call in list(self.calls.values()):
            try:
                call.release()
            except Exception:
                logger.exception("could not release %r", call)
        self.calls.clear()


class OpCall(RuntimeCall):
    """A server operation that runs as a task of the connection."""

    __slots__ = ("cancelled", "conn", "credit_event", "scope", "stream")

    def __init__(self, conn: Connection, sid: int, stream: bool) -> None:
        super().__init__(conn, sid, RUNNING)
        self.conn = conn
        self.stream = stream
        self.scope: anyio.CancelScope | None = None
        self.credit_event = anyio.Event()
        # Its task may not have started yet when a Cancel (or the end of the
        # connection) arrives: remembered here, it cancels the task's scope at once.
        self.cancelled = False

    def on_cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def on_credit(self) -> None:
        self.credit_event.set()

    async def wait_credit(self) -> None:
        while self.conn.credit(self.sid) <= 0:
            self.credit_event = anyio.Event()
            await self.credit_event.wait()

    def abandon(self) -> bool:
        self.on_cancel()
        return True


_HANDLERS: dict[type, Callable[[Connection, Message], None]] = {
    Call: Connection.on_call,
    Credit: Connection.on_credit,
    Cancel: Connection.on_cancel,
    Close: Connection.on_close,
}
