"""Forwarded channels: where a hub may forward to, and moving the bytes.

Each authenticated SSH connection gets one :class:`ForwardingSession`: one
thread that waits on all the connection's channels and destination sockets
with a selector. Threads grow with connections, never with channels.
"""

import collections
import errno
import re
import selectors
import socket
import threading
import time

CHUNK = 256 * 1024
# how often a channel waiting for the client's window is retried, in seconds
STALL_RETRY = 0.005
# how often channels are checked for clients that ignore the window
FLOOD_CHECK = 1.0

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def parse_service(service):
    """``(host, port)`` of a server address (``host:port`` or
    ``http(s)://host:port``); None when it is neither"""
    text = re.sub(r"^https?://", "", (service or "").strip(), flags=re.IGNORECASE)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in host:
        return None
    return normal_host(host), int(port)


def normal_host(host):
    return host.strip().strip("[]").lower()


class _Pipe:
    """One forwarded channel and its destination socket"""

    def __init__(self, chan, sock, destination, server_key):
        self.chan = chan
        self.sock = sock
        self.destination = destination
        self.server_key = server_key
        self.to_sock = b""  # from the client, not yet written to the destination
        self.to_chan = b""  # from the destination, not yet sent to the client
        self.chan_eof = False
        self.sock_eof = False
        self.masks = {}  # fd -> mask registered now

    @property
    def done(self):
        return self.chan_eof and self.sock_eof and not self.to_sock and not self.to_chan

    def wanted(self):
        """fd -> the events to wait for now"""
        sock_mask = (0 if self.to_chan or self.sock_eof else _READ) | (_WRITE if self.to_sock else 0)
        chan_mask = 0 if self.to_sock or self.chan_eof else _READ
        return {self.sock.fileno(): sock_mask, self.chan.fileno(): chan_mask}


class ForwardingSession:
    """The forwarded channels of one hub's SSH connection.

    The transport thread hands over channels it accepted (:meth:`offer`);
    everything else happens in this session's own thread. Other threads
    ask for channels to be closed with :meth:`close_where`.
    """

    def __init__(self, transport, hub, log, window_limit):
        self.transport = transport
        self.hub = hub
        self.log = log
        self.window_limit = window_limit
        self.pipes = {}  # chanid -> _Pipe
        self._offered = {}  # chanid -> (sock, destination, server_key)
        self._requests = collections.deque()
        self._lock = threading.Lock()
        self._stopped = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ, None)
        self._next_flood_check = 0.0
        self.thread = threading.Thread(target=self._run, name=f"ssh-forward-{hub}", daemon=True)

    def start(self):
        self.thread.start()

    @property
    def open_count(self):
        with self._lock:
            return len(self.pipes) + len(self._offered)

    def offer(self, chanid, sock, destination, server_key):
        """A channel was allowed and its destination connected (transport thread)"""
        with self._lock:
            self._offered[chanid] = (sock, destination, server_key)
        self._wake()

    def close_where(self, predicate, reason):
        """Close the channels whose pipe matches ``predicate`` (any thread)"""
        self._requests.append((predicate, reason))
        self._wake()

    def stop(self):
        self._stopped = True
        self._wake()

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already awake, or stopped

    # the session's thread

    def _run(self):
        try:
            while not self._stopped and self.transport.is_active():
                stalled = any(p.to_chan for p in self.pipes.values())
                events = self._selector.select(STALL_RETRY if stalled else 1.0)
                for key, mask in events:
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._step(*key.data, mask)
                self._accept_offered()
                self._handle_requests()
                if stalled:
                    for pipe in list(self.pipes.values()):
                        if pipe.to_chan:
                            self._step(pipe, "chan", 0)
                self._check_floods()
        except Exception:
            self.log.exception("SSH forwarding of hub %s failed", self.hub)
        finally:
            for pipe in list(self.pipes.values()):
                self._close(pipe)
            self._discard_offered()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept_offered(self):
        with self._lock:
            waiting = len(self._offered)
        while waiting:
            # the transport queues the channel right after allowing it
            chan = self.transport.accept(timeout=2)
            if chan is None:
                return
            waiting -= 1
            chan.settimeout(0.0)
            with self._lock:
                # counted as offered until here, as a pipe from here, never as
                # neither: the transport thread checks the limit meanwhile
                offered = self._offered.pop(chan.get_id(), None)
                pipe = None if offered is None else _Pipe(chan, *offered)
                if pipe is not None:
                    self.pipes[chan.get_id()] = pipe
            if pipe is None:
                chan.close()
                continue
            pipe.sock.setblocking(False)
            self._update(pipe)

    def _discard_offered(self):
        with self._lock:
            offered, self._offered = self._offered, {}
        for sock, _, _ in offered.values():
            sock.close()

    def _handle_requests(self):
        while self._requests:
            predicate, reason = self._requests.popleft()
            for pipe in [p for p in self.pipes.values() if predicate(p)]:
                self.log.info(
                    "SSH: closing the forward of hub %s to %s:%s (%s)",
                    self.hub, *pipe.destination, reason,
                )  # fmt: skip
                self._close(pipe)

    def _check_floods(self):
        now = time.monotonic()
        if now < self._next_flood_check:
            return
        self._next_flood_check = now + FLOOD_CHECK
        for pipe in list(self.pipes.values()):
            if len(pipe.chan.in_buffer) > self.window_limit:
                self.log.warning(
                    "SSH: hub %s sent more than the channel window to %s:%s; closing it",
                    self.hub, *pipe.destination,
                )  # fmt: skip
                self._close(pipe)

    def _step(self, pipe, side, mask):
        try:
            if side == "chan":
                self._from_chan(pipe)
                self._to_chan(pipe)
            else:
                if mask & _WRITE:
                    self._to_sock(pipe)
                if mask & _READ:
                    self._from_sock(pipe)
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE, None):
                self.log.debug("SSH forward of hub %s to %s:%s: %s", self.hub, *pipe.destination, e)
            self._close(pipe)
            return
        except EOFError:  # paramiko: the hub's connection is gone (the session ends with it)
            self._close(pipe)
            return
        if pipe.chan.closed or pipe.done:
            self._close(pipe)
        elif pipe.chan.get_id() in self.pipes:
            self._update(pipe)

    def _from_chan(self, pipe):
        if pipe.to_sock or pipe.chan_eof or not pipe.chan.recv_ready() and not pipe.chan.eof_received:
            return
        try:
            data = pipe.chan.recv(CHUNK)
        except socket.timeout:
            return
        if data:
            pipe.to_sock = data
            self._to_sock(pipe)
        else:
            pipe.chan_eof = True
            self._to_sock(pipe)

    def _to_sock(self, pipe):
        if pipe.to_sock:
            try:
                sent = pipe.sock.send(pipe.to_sock)
            except BlockingIOError:
                return
            pipe.to_sock = pipe.to_sock[sent:]
        if pipe.chan_eof and not pipe.to_sock:
            _shutdown_write(pipe.sock)

    def _from_sock(self, pipe):
        if pipe.to_chan or pipe.sock_eof:
            return
        try:
            data = pipe.sock.recv(CHUNK)
        except BlockingIOError:
            return
        if data:
            pipe.to_chan = data
        else:
            pipe.sock_eof = True
        self._to_chan(pipe)

    def _to_chan(self, pipe):
        while pipe.to_chan and pipe.chan.send_ready():
            try:
                sent = pipe.chan.send(pipe.to_chan)
            except socket.timeout:
                return
            if sent == 0:  # closed by the client
                pipe.to_chan = b""
                pipe.chan_eof = True
                return
            pipe.to_chan = pipe.to_chan[sent:]
        if pipe.sock_eof and not pipe.to_chan and not pipe.chan.eof_sent:
            pipe.chan.shutdown_write()

    def _update(self, pipe):
        for fd, mask in pipe.wanted().items():
            current = pipe.masks.get(fd, 0)
            if mask == current:
                continue
            side = "sock" if fd == pipe.sock.fileno() else "chan"
            if not current:
                self._selector.register(fd, mask, (pipe, side))
            elif not mask:
                self._selector.unregister(fd)
            else:
                self._selector.modify(fd, mask, (pipe, side))
            pipe.masks[fd] = mask

    def _close(self, pipe):
        for fd, mask in pipe.masks.items():
            if mask:
                try:
                    self._selector.unregister(fd)
                except (KeyError, ValueError):
                    pass
        pipe.masks = {}
        self.pipes.pop(pipe.chan.get_id(), None)
        pipe.sock.close()
        try:
            pipe.chan.close()
        except (EOFError, OSError):
            pass  # the hub's connection is gone: there is no one to tell


def _shutdown_write(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
