"""The SSH endpoint: listener, limits for strangers, authentication.

One thread accepts connections and enforces the limits on those that have
not logged in yet; paramiko runs a thread per admitted connection; each
logged-in connection that forwards gets one :class:`ForwardingSession`.
Decisions that need the records run on the Outpost's event loop.
"""

import asyncio
import collections
import select
import socket
import threading
import time

import paramiko

from .forwarding import ForwardingSession, normal_host, parse_service
from .keys import fingerprint, load_or_create_host_key

KEX = ("mlkem768x25519-sha256", "curve25519-sha256@libssh.org")
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# not used with AES-GCM, but the key exchange must agree on one
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
HOST_KEY_TYPES = ("ssh-ed25519",)
# wait this long for the records when a channel opens, in seconds
RECORDS_TIMEOUT = 10
# at most one line per this many seconds about refused strangers
REFUSAL_LOG_INTERVAL = 10
MAX_AUTH_FAILURES = 6


class _Connection:
    """One TCP connection to the endpoint and what is known about it"""

    def __init__(self, sock, address, deadline):
        self.sock = sock
        self.address = address
        self.source = address[0]
        self.deadline = deadline
        self.failures = 0
        self.hub = None  # once logged in
        self.transport = None
        self.session = None

    @property
    def name(self):
        return f"{self.address[0]}:{self.address[1]}"


class _HubLogin(paramiko.ServerInterface):
    """paramiko's questions about one connection (asked in its thread)"""

    def __init__(self, endpoint, conn):
        self.endpoint = endpoint
        self.conn = conn

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_none(self, username):
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username, password):
        return self.endpoint.login_failed(self.conn, username, "a password")

    def check_auth_interactive(self, username, submethods):
        return self.endpoint.login_failed(self.conn, username, "keyboard-interactive")

    def check_auth_publickey(self, username, key):
        if self.endpoint.key_allowed(username, key):
            return paramiko.AUTH_SUCCESSFUL
        return self.endpoint.login_failed(self.conn, username, f"an unknown {key.get_name()} key")

    def check_channel_request(self, kind, chanid):
        self.endpoint.refuse(self.conn, f"a {kind!r} channel")
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid, origin, destination):
        return self.endpoint.open_forward(self.conn, chanid, destination)

    def check_port_forward_request(self, address, port):
        self.endpoint.refuse(self.conn, f"remote forwarding from {address}:{port}")
        return False

    def check_global_request(self, kind, msg):
        # keepalive@openssh.com and the like: a failure reply is an answer
        return False


class SSHEndpoint:
    """The Outpost's SSH server: direct-tcpip to a hub's own servers only.

    Parameters:
        app: the :class:`~jupyterhub_outpost.app.JupyterHubOutpost` whose
            ``ssh_*`` settings apply and whose records decide
        authorized_keys: hub name -> set of public key blobs
    """

    def __init__(self, app, authorized_keys):
        self.app = app
        self.log = app.log
        self.db = app.db
        self.authorized_keys = authorized_keys
        self.host_key = None
        self.bound_port = None
        self.loop = None
        self._listener = None
        self._thread = None
        self._closing = False
        self._lock = threading.Lock()
        self._pending = set()  # connections not logged in yet
        self._per_source = collections.Counter()
        self._logged_in = set()
        self._forwarding = set()  # the ForwardingSessions running now
        self._refused = 0
        self._refusal_logged = 0.0
        self._sweeper = None

    # starting and stopping (on the event loop)

    def load_host_key(self):
        path = self.app.ssh_host_key_file
        self.host_key, created = load_or_create_host_key(path)
        self.log.info(
            "SSH host key %s %s (%s)",
            self.host_key.get_name(), fingerprint(self.host_key),
            f"generated in {path}" if created else path,
        )  # fmt: skip

    def start(self):
        self.loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in (self.app.ssh_ip or "") else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.app.ssh_ip or "", self.app.ssh_port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.bound_port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="ssh-accept", daemon=True)
        self._thread.start()
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        self.log.info("SSH endpoint listening on %s:%i", self.app.ssh_ip or "*", self.bound_port)

    async def stop(self):
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._thread is not None:
            await self.loop.run_in_executor(None, self._stop_threads)

    def _stop_threads(self):
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            conns = list(self._pending | self._logged_in)
        for conn in conns:
            self._drop(conn)

    # the accepting thread

    def _serve(self):
        while not self._closing:
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.25)
            except (OSError, ValueError):
                return
            if ready:
                self._accept()
            self._housekeeping()

    def _accept(self):
        try:
            sock, address = self._listener.accept()
        except OSError:
            return
        with self._lock:
            crowded = len(self._pending) >= self.app.ssh_max_unauthenticated
            if not crowded and self._per_source[address[0]] < self.app.ssh_max_unauthenticated_per_source:
                conn = _Connection(sock, address, time.monotonic() + self.app.ssh_login_grace_time)
                self._pending.add(conn)
                self._per_source[conn.source] += 1
            else:
                conn = None
        if conn is None:
            sock.close()
            self._note_refusal(address, crowded)
            return
        try:
            self._start_transport(conn)
        except Exception as e:
            self.log.info("SSH connection from %s failed: %s", conn.name, e)
            self._drop(conn)

    def _start_transport(self, conn):
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        window = self.app.ssh_channel_window
        transport = paramiko.Transport(conn.sock, default_window_size=window)
        options = transport.get_security_options()
        # the modern ones this paramiko has (ML-KEM needs a recent cryptography)
        options.kex = [k for k in KEX if k in options.kex]
        options.ciphers = [c for c in CIPHERS if c in options.ciphers]
        options.digests = MACS
        options.key_types = HOST_KEY_TYPES
        options.compression = ("none",)
        grace = self.app.ssh_login_grace_time
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = grace
        transport.add_server_key(self.host_key)
        conn.transport = transport
        transport.start_server(event=threading.Event(), server=_HubLogin(self, conn))

    def _note_refusal(self, address, crowded):
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            self.log.warning(
                "SSH: refused %i connection(s) (latest from %s) before login: %s",
                self._refused, address[0],
                "too many connections not logged in" if crowded else "too many from that address",
            )  # fmt: skip
            self._refused = 0
            self._refusal_logged = now

    def _housekeeping(self):
        now = time.monotonic()
        with self._lock:
            pending, logged_in = list(self._pending), list(self._logged_in)
        for conn in pending:
            transport = conn.transport
            if transport is not None and transport.is_authenticated():
                with self._lock:
                    self._pending.discard(conn)
                    self._per_source[conn.source] -= 1
                    self._logged_in.add(conn)
                conn.hub = transport.get_username()
                self.log.info("SSH: hub %s logged in from %s", conn.hub, conn.name)
            elif transport is None or not transport.is_alive():
                # its slot is free once its thread has ended
                self._drop(conn)
            elif transport.is_active() and (now > conn.deadline or conn.failures >= MAX_AUTH_FAILURES):
                self.log.info("SSH: closing %s, which did not log in", conn.name)
                transport.close()
        for conn in logged_in:
            if not conn.transport.is_active():
                self.log.info("SSH: hub %s disconnected (%s)", conn.hub, conn.name)
                self._drop(conn)

    def _drop(self, conn):
        with self._lock:
            if conn in self._pending:
                self._pending.discard(conn)
                self._per_source[conn.source] -= 1
                if not self._per_source[conn.source]:
                    del self._per_source[conn.source]
            self._logged_in.discard(conn)
            self._forwarding.discard(conn.session)
        if conn.session is not None:
            conn.session.stop()
        if conn.transport is not None:
            conn.transport.close()
            # paramiko's handshake timer would otherwise keep its thread until
            # it expires, long after a stranger's connection ended
            conn.transport.packetizer.complete_handshake()
        else:
            conn.sock.close()

    # authentication (paramiko's threads)

    def key_allowed(self, hub, key):
        return key.asbytes() in self.authorized_keys.get(hub, ())

    def login_failed(self, conn, hub, what):
        conn.failures += 1
        self.log.warning("SSH: login as hub %r from %s refused (%s)", hub[:128], conn.name, what)
        time.sleep(self.app.ssh_failed_login_delay)
        return paramiko.AUTH_FAILED

    def refuse(self, conn, what):
        hub = conn.transport.get_username() if conn.transport else None
        self.log.warning("SSH: refused %s for hub %s (%s)", what, hub, conn.name)

    # forwarding (paramiko's threads)

    def open_forward(self, conn, chanid, destination):
        transport = conn.transport
        hub = transport.get_username()
        if not transport.is_authenticated() or hub is None:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        host, port = normal_host(destination[0]), destination[1]
        session = self._session_of(conn, hub)
        if session.open_count >= self.app.ssh_max_channels_per_connection:
            self.log.warning(
                "SSH: hub %s has %i forwards open on %s; refusing more", hub, session.open_count, conn.name
            )
            return paramiko.OPEN_FAILED_RESOURCE_SHORTAGE
        hub_count = self._open_count_of(hub)
        if hub_count >= self.app.ssh_max_channels_per_hub:
            self.log.warning("SSH: hub %s has %i forwards open; refusing more", hub, hub_count)
            return paramiko.OPEN_FAILED_RESOURCE_SHORTAGE
        try:
            future = asyncio.run_coroutine_threadsafe(self._server_at(hub, host, port), self.loop)
            server_key = future.result(RECORDS_TIMEOUT)
        except Exception as e:
            self.log.error("SSH: cannot check the forward of hub %s to %s:%s: %r", hub, host, port, e)
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        if server_key is None:
            self.log.warning(
                "SSH: refused forward of hub %s to %s:%s: not one of its running servers", hub, host, port
            )
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        try:
            sock = socket.create_connection((host, port), timeout=self.app.ssh_connect_timeout)
        except OSError as e:
            self.log.warning("SSH: forward of hub %s to %s:%s failed: %s", hub, host, port, e)
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session.offer(chanid, sock, (host, port), server_key)
        return paramiko.OPEN_SUCCEEDED

    def _open_count_of(self, hub):
        """Forwards open over all connections of ``hub``"""
        with self._lock:
            sessions = [s for s in self._forwarding if s.hub == hub]
        return sum(s.open_count for s in sessions)

    def _session_of(self, conn, hub):
        with self._lock:
            if conn.session is None:
                window = conn.transport.default_window_size
                conn.session = ForwardingSession(conn.transport, hub, self.log, window_limit=2 * window)
                conn.session.start()
                self._forwarding.add(conn.session)
            return conn.session

    # the records (on the event loop)

    async def _server_at(self, hub, host, port):
        """The key of the running server of ``hub`` at host:port, or None"""
        for record in await self.db.list_servers(hub):
            if not record.stop_pending and parse_service(record.service) == (host, port):
                return record.key
        return None

    def server_forgotten(self, record):
        """Close the channels to a server this process stopped"""
        for session in self._sessions(record.hub):
            session.close_where(lambda pipe: pipe.server_key == record.key, "the server stopped")

    def _sessions(self, hub=None):
        with self._lock:
            sessions = list(self._forwarding)
        return [s for s in sessions if hub in (None, s.hub)]

    async def _sweep_forever(self):
        """Close channels to servers that other processes stopped"""
        while True:
            await asyncio.sleep(self.app.ssh_sweep_interval)
            try:
                await self._sweep()
            except Exception as e:
                self.log.error("SSH: checking open forwards failed: %r", e)

    async def _sweep(self):
        by_hub = collections.defaultdict(list)
        for session in self._sessions():
            if session.pipes:
                by_hub[session.hub].append(session)
        for hub, sessions in by_hub.items():
            running = {r.key for r in await self.db.list_servers(hub) if not r.stop_pending and r.service}
            for session in sessions:
                session.close_where(lambda pipe: pipe.server_key not in running, "the server stopped")

    @property
    def thread_count(self):
        """Threads the endpoint runs now: accepting, transports, forwarding
        (and, not counted here, paramiko's timer of each handshake under way)"""
        with self._lock:
            conns = list(self._pending | self._logged_in)
        transports = sum(1 for c in conns if c.transport is not None and c.transport.is_alive())
        sessions = sum(1 for c in conns if c.session is not None and c.session.thread.is_alive())
        return 1 + transports + sessions
