"""CURVE authentication for the ZeroMQ links between stages (``network.curve`` in the config).

Every link has one binding side (streamer work ROUTER, replay ROUTER, supervisor PULL) and
connecting sides. With ``enabled: true`` the binding socket becomes a CURVE server holding
the server secret key, and a ZAP authenticator (one thread per ``zmq.Context``) lets in only
clients whose public key is a ``*.key`` file in ``authorized_clients``. The folder is read again
when it changes, so a key copied in or removed counts from the next handshake on, without a
restart (a connection already up stays up). Unknown keys are
refused before any message is delivered, and every refusal is counted in
``reliev3r_auth_failures_total{stage}``. Connecting sockets carry the client key pair and
the server's public key. With ``enabled: false`` both helpers do nothing. :func:`key_problem`
checks a process's files before it starts (each side needs only its own).

Keys are ZeroMQ certificate files (the czmq layout pyzmq's ``zmq.auth`` reads): ``NAME.key``
holds the public key, ``NAME.key_secret`` both keys and is written with mode 0600. The files are
replaced together and durably: every new one is written whole to its temporary file (fsynced, a
secret's with mode 0600 from its first byte on) before any is renamed into place, so a write cut
short (a full disk) leaves every earlier key, never a new public key beside an old secret.
``reliev3r keys --out DIR`` writes::

    DIR/server.key  DIR/server.key_secret  DIR/client.key  DIR/client.key_secret
    DIR/authorized_clients/client.key

One client key pair shared by every stage is the simple setup; a key per host works the
same, with each public key copied into ``authorized_clients``.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path

import zmq
from zmq.auth.certs import load_certificate
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from reliev3r import durable
from reliev3r.config_base import CurveConfig  # re-exported

_log = logging.getLogger(__name__)

ZAP_DOMAIN = "reliev3r"


class SecurityError(ValueError):
    """CURVE keys missing or unreadable; the message names the file."""


# --------------------------------------------------------------------------- keys

class KeysPartlyReplaced(OSError):
    """A rename of the new keys into place failed after others had been renamed (the file system
    failing between renames, which need no room for data): some keys are new, some old, so a pair
    may not match until the keys are written again."""


def _cert(public: bytes, secret: bytes | None) -> str:
    """A certificate file's text: the public key, and the secret where given."""
    kind = "Secret" if secret else "Public"
    lines = [f"#   ****  Generated on {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC by reliev3r keys  ****",
             f"#   ZeroMQ CURVE {kind} Certificate",
             "#   Exchange securely, or use a secure mechanism to verify the contents" if not secret else
             "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.",
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _make_folder(folder: Path) -> None:
    """``mkdir -p folder``, each folder made flushed in its parent (a power loss keeps its name)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for path in reversed(made):
        durable.fsync(path.parent)


def _replace_together(files: list[tuple[Path, str, bool]]) -> None:
    """Replace every ``(path, text, secret)`` together, as far as the file system allows: each
    new file written whole to its temporary file (``PATH.tmp``, fsynced, mode 0600 for a secret
    and 0644 for a public key from its first byte on, whatever the umask), and only once all are
    whole renamed into place, then each folder fsynced once. A write that fails (a full disk)
    removes every temporary file and leaves every key as it was; a rename that fails, after
    others went through, raises :class:`KeysPartlyReplaced`."""
    tmps: list[Path] = []
    try:
        for path, text, secret in files:
            tmps.append(path.with_name(f"{path.name}.tmp"))
            durable.write_temporary(tmps[-1], text, mode=0o600 if secret else 0o644)
        for done, ((path, _, _), tmp) in enumerate(zip(files, tmps)):
            try:
                os.replace(tmp, path)
            except OSError as err:
                if not done:
                    raise
                raise KeysPartlyReplaced(err.errno, f"{err.strerror or err} after {done} of {len(files)} key "
                                                    "files were renamed into place: a key pair may not match",
                                         str(path)) from err
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for path, _, _ in files):
        durable.fsync(folder)


def generate_keys(folder: str | Path, *, clients: tuple[str, ...] = ("client",),
                  overwrite: bool = False) -> dict[str, Path]:
    """Write a server key pair and one key pair per client name into ``folder``, and every
    client's public key into ``folder/authorized_clients``. Returns name -> file path
    (``server``, ``server_secret``, ``<client>``, ``<client>_secret``).

    The files are replaced together: every new one is written whole before any is renamed into
    place, so a write that fails (OSError, e.g. a full disk) leaves every key as it was and no
    temporary file. Only a rename failing after others went through (:class:`KeysPartlyReplaced`)
    can leave a pair that does not match. Folders made here are flushed in their parents."""
    folder = Path(folder)
    _make_folder(folder)
    os.chmod(folder, 0o700)
    allowed = folder / "authorized_clients"
    _make_folder(allowed)
    names = ("server", *clients)
    there = [p for n in names for p in (folder / f"{n}.key", folder / f"{n}.key_secret", allowed / f"{n}.key")
             if p.exists() and not (n == "server" and p.parent == allowed)]
    if there and not overwrite:  # any of them: a client host holds its own pair and the server's public key
        listed = ", ".join(str(p.relative_to(folder)) for p in there)
        raise FileExistsError(f"{folder} holds keys ({listed}); pass overwrite=True to replace the keys")
    written: dict[str, Path] = {}
    files: list[tuple[Path, str, bool]] = []
    for name in names:
        public, secret = zmq.curve_keypair()
        files += [(folder / f"{name}.key", _cert(public, None), False),
                  (folder / f"{name}.key_secret", _cert(public, secret), True)]
        written[name] = folder / f"{name}.key"
        written[f"{name}_secret"] = folder / f"{name}.key_secret"
        if name != "server":
            files.append((allowed / f"{name}.key", files[-2][1], False))
    _replace_together(files)
    return written


def _load(path: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not Path(path).is_file():  # the library's words for it, "Invalid certificate file", hide the cause
        where = "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise SecurityError(f"CURVE certificate {path} does not exist{where}")
    try:
        public, secret_key = load_certificate(path)
    except (OSError, ValueError) as err:
        raise SecurityError(f"cannot read CURVE certificate {path}: {err}") from None
    if secret and not secret_key:
        raise SecurityError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def key_problem(curve: CurveConfig | None, *, server: bool, client: bool) -> str | None:
    """Why the CURVE files a process needs cannot be used, naming the ``network.curve`` key that
    gives the file, or None (CURVE off, or every file loads). ``server``: it binds a link (the
    server secret and ``authorized_clients``); ``client``: it connects to one (its own secret and
    the server's public key). Checked before a process starts, so a missing file is said in a
    line, not found after the stage's start (a teacher loaded) as a traceback."""
    if curve is None or not curve.enabled:
        return None
    needed = ([("server_secret_key", True)] if server else []) + \
             ([("client_secret_key", True), ("server_public_key", False)] if client else [])
    for name, secret in needed:
        try:
            _load(getattr(curve, name), secret=secret)
        except SecurityError as err:
            return f"network.curve.{name}: {err}"
    if server:
        try:
            _authorized_keys(Path(curve.authorized_clients))
        except SecurityError as err:
            return f"network.curve.authorized_clients: {err}"
    return None


def _authorized_keys(folder: Path) -> None:
    """Raise :class:`SecurityError` unless ``folder`` holds client public keys that all load."""
    if not folder.is_dir():
        raise SecurityError(f"authorized_clients folder {folder} does not exist")
    if not list(folder.glob("*.key")):
        raise SecurityError(f"authorized_clients folder {folder} holds no *.key public keys")
    for key in sorted(folder.glob("*.key")):  # the library skips the whole folder on one bad file
        try:
            load_certificate(str(key))
        except (OSError, ValueError) as err:
            raise SecurityError(f"authorized client key {key} does not load ({err}): every client would be "
                                "refused; remove or replace it") from None


# --------------------------------------------------------------------------- authenticator

class _AuthorizedClients:
    """The client public keys a server admits: the ``*.key`` files of its ``authorized_clients``
    folder, read again when the folder changes, so a key copied in is admitted at its client's
    next handshake and a key removed is refused at the next (a connection already up stays up:
    CURVE checks a key at the handshake only). Each handshake compares the folder's listing
    (each key file's name, inode, size and modification time) with the last one read, so the
    keys are read again only after a change. A file that does not load (one still being copied,
    a damaged one) is named in the log and admits nobody; the rest still count. Called by the
    authenticator's thread alone (pyzmq's credentials provider)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._listing: object = None
        self._keys: dict[bytes, str] = {}
        """z85 public key -> the name of the file that holds it."""
        self._refresh(quiet=True)

    def callback(self, domain: str, key: bytes) -> bool:
        """Whether the client's public key ``key`` (z85) is admitted now."""
        self._refresh()
        return key in self._keys

    def _list(self) -> object:
        """The folder's key files as (name, inode, size, mtime), or why it cannot be read."""
        try:
            listing = []
            for entry in os.scandir(self.folder):
                if entry.name.endswith(".key"):
                    st = entry.stat()
                    listing.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
            return sorted(listing)
        except OSError as err:
            return f"{err.strerror or err}: {err.filename or self.folder}"

    def _refresh(self, *, quiet: bool = False) -> None:
        listing = self._list()
        if listing == self._listing:
            return
        self._listing = listing
        keys: dict[bytes, str] = {}
        if isinstance(listing, str):
            _log.warning("CURVE authorized_clients folder %s cannot be read (%s): no client is admitted",
                         self.folder, listing)
        else:
            for name, *_ in listing:
                try:
                    public, _ = load_certificate(str(self.folder / name))
                except (OSError, ValueError) as err:
                    public = None
                    _log.warning("CURVE authorized client key %s does not load (%s): it admits nobody",
                                 self.folder / name, err)
                if public:
                    keys[public] = name
        added = sorted(name for key, name in keys.items() if key not in self._keys)
        removed = sorted(name for key, name in self._keys.items() if key not in keys)
        self._keys = keys
        if not quiet and (added or removed):
            said = ([f"now admits {', '.join(added)}"] if added else []) + \
                   ([f"no longer admits {', '.join(removed)}"] if removed else [])
            _log.info("CURVE authorized_clients %s changed: %s (new connections; one up stays up)", self.folder,
                      "; ".join(said))


class _CountingAuthenticator(ThreadAuthenticator):
    """ZAP handler that counts every refusal (pyzmq answers each handshake through
    ``_send_zap_reply``; anything but 200 is a refused peer)."""

    def __init__(self, context: zmq.Context, on_refusal):
        super().__init__(context)
        self._on_refusal = on_refusal
        self._said: set[bytes] = set()

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous"):
        if status_code != b"200":
            self._on_refusal()
            if status_text not in self._said:  # once per reason: a refused peer retries for ever
                self._said.add(status_text)
                _log.warning("CURVE refused a peer (%s): its public key is not in authorized_clients, or it "
                             "uses no CURVE; counted in reliev3r_auth_failures_total",
                             status_text.decode(errors="replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


_lock = threading.Lock()
_authenticators: "weakref.WeakKeyDictionary[zmq.Context, _CountingAuthenticator]" = weakref.WeakKeyDictionary()
_counters: "weakref.WeakKeyDictionary[object, object]" = weakref.WeakKeyDictionary()


def auth_failures(metrics):
    """``reliev3r_auth_failures_total{stage}`` on a process's :class:`~monitoring.metrics.Metrics`
    (created once, exported at 0 from the start so dashboards and alerts see the series)."""
    with _lock:
        child = _counters.get(metrics)
        if child is None:
            counter = metrics.counter("auth_failures_total", "ZeroMQ peers refused by CURVE authentication",
                                      ["stage"])
            child = counter.labels(metrics.stage)
            _counters[metrics] = child
        return child


def _authenticator(ctx: zmq.Context, curve: CurveConfig, metrics) -> _CountingAuthenticator:
    with _lock:
        auth = _authenticators.get(ctx)
    if auth is not None:
        return auth
    folder = Path(curve.authorized_clients)
    _authorized_keys(folder)
    counter = auth_failures(metrics) if metrics is not None else None
    auth = _CountingAuthenticator(ctx, counter.inc if counter is not None else (lambda: None))
    auth.start()
    # Read now and again when the folder changes: a key added or removed counts at the next handshake.
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_AuthorizedClients(folder))
    with _lock:
        _authenticators[ctx] = auth
    return auth


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the context's ZAP thread, if any; call before ``ctx.destroy()``."""
    with _lock:
        auth = _authenticators.pop(ctx, None)
    if auth is not None:
        auth.stop()


# --------------------------------------------------------------------------- sockets

def secure_server(sock: zmq.Socket, curve: CurveConfig | None, metrics=None) -> bool:
    """Make ``sock`` (before ``bind``) a CURVE server that only admits authorised clients.
    Refusals count into ``metrics`` (a :class:`~monitoring.metrics.Metrics`). Returns whether
    CURVE was applied (False when ``curve`` is None or disabled)."""
    if curve is None or not curve.enabled:
        return False
    public, secret = _load(curve.server_secret_key, secret=True)
    _authenticator(sock.context, curve, metrics)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    return True


def secure_client(sock: zmq.Socket, curve: CurveConfig | None) -> bool:
    """Give ``sock`` (before ``connect``) the client key pair and the server's public key.
    Returns whether CURVE was applied."""
    if curve is None or not curve.enabled:
        return False
    public, secret = _load(curve.client_secret_key, secret=True)
    server_public, _ = _load(curve.server_public_key, secret=False)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public
    return True


# --------------------------------------------------------------------------- links

LINK_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
"""The socket events :class:`LinkWatch` reads (a failed TCP connect is ``EVENT_CLOSED``)."""
HANDSHAKING = "CURVE handshake under way"
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
WATCH_JOIN_S = 10.0
"""How long :meth:`LinkWatch.close` waits for its thread (it ends within milliseconds: ZeroMQ's
last event of a stopped monitor comes at once; this bounds a hang only)."""
REJOIN_FIRST_S = 5.0
"""How long after a CURVE refusal :meth:`LinkWatch.rejoin_due` first says to replace the socket;
the wait doubles with each replacement refused again, up to :data:`REJOIN_MAX_S`."""
REJOIN_MAX_S = 30.0
"""The longest wait between two replacements of a refused socket (a refusal is counted and
logged on the server's side: this bounds the noise of a key that stays unauthorised)."""
_watches = itertools.count()


class _Seen:
    """A link's state as the events so far make it (:class:`LinkWatch`'s thread writes it)."""
    __slots__ = ("up", "state", "failed", "refused", "refused_at", "wait")

    def __init__(self, state: str):
        self.up, self.state, self.failed, self.refused = False, state, False, False
        self.refused_at: float | None = None
        """When the current socket's key was refused (monotonic seconds)."""
        self.wait = REJOIN_FIRST_S
        """How long after a refusal the socket is replaced (:meth:`LinkWatch.rejoin_due`)."""


class LinkWatch:
    """Whether a connecting socket's link to its peer is up, and if not why, read from the
    socket's ZeroMQ monitor. To the application, a peer that is not there, one that refuses this
    process's CURVE keys and an idle one look the same: no message. The socket's own events tell
    them apart: no TCP connection (nothing answers at the address), a CURVE handshake refused by
    the server's authenticator (the client key is not in its ``authorized_clients``), one the
    server drops (the server public key is not its own), CURVE on one side only, or a handshake
    that went through.

    ``watch(sock)`` before ``sock.connect``, again for each fresh socket of the same link (the
    state carries over); :meth:`close` before or after closing the socket, and before its
    context ends. A daemon thread per watched socket takes its events as they come, whatever the
    owner does: ZeroMQ sends them from the context's I/O thread, which blocks once some 2,000 lie
    unread and then serves no socket of the context (a peer that is down gives an event per
    reconnection attempt, ten a second). :meth:`poll`, in the thread that owns the socket, brings
    :attr:`up`, :attr:`state` and :attr:`refused` up to date. ``peer`` names the stage at the
    other end, ``port_key`` the ``network`` key of its port.

    ZeroMQ never tries a handshake that the server's authenticator refused again on that socket
    (libzmq 4.3.5, measured: the socket disconnects, reconnects no more and takes no message;
    a ``disconnect`` and ``connect`` of it, or a fresh socket, handshake anew). The owner
    replaces a refused socket when :meth:`rejoin_due` says so (5 s after the refusal, then up to
    every 30 s): the key may have been authorised since, and the server reads its
    ``authorized_clients`` again when they change."""

    def __init__(self, endpoint: str, peer: str, port_key: str, curve: CurveConfig | None):
        self.endpoint, self.peer, self.port_key = endpoint, peer, port_key
        self.curve = curve if curve is not None and curve.enabled else None
        self.up = False
        """The last handshake went through and the connection has not been lost since."""
        self.state = (f"no connection to {endpoint} yet: a host name that does not resolve, a host that does not "
                      f"answer, or a port a firewall drops? (network.connect_host, network.{port_key})")
        """:attr:`up`'s words, or why the link is not up (until the first event: no connection yet,
        as to a host name ZeroMQ cannot resolve, which gives no event, or to a host that drops the
        connection attempt: a TCP connect gives up after minutes)."""
        self.refused = False
        """The server's authenticator refused this client key: ZeroMQ does not try it again on
        this socket, so the link stays down until the socket is replaced (:meth:`rejoin_due`)."""
        self.events = 0
        """The monitor events taken so far, of every socket watched."""
        self._lock = threading.Lock()
        self._seen = _Seen(self.state)
        """The state as of the last event taken (under :attr:`_lock`); :meth:`poll` copies it."""
        self._said = self.state
        """:attr:`state` at the last :meth:`poll`."""
        self._current: object | None = None
        """The token of the thread whose events count (a closed socket's late ones do not)."""
        self._sock: zmq.Socket | None = None
        self._thread: threading.Thread | None = None

    def watch(self, sock: zmq.Socket) -> None:
        self.close()
        token = object()
        with self._lock:
            self._current, self._seen.refused, self._seen.refused_at = token, False, None
        self.refused = False
        address = f"inproc://reliev3r-link-watch-{os.getpid()}-{next(_watches)}"
        # The thread's socket is connected before the monitor is bound (inproc allows it), so no
        # event is ever sent with no one there, and every failure below undoes what was done.
        # Not made by ctx.socket: ctx.destroy() closes the sockets made so, from its own thread,
        # which this one, in use by the watch's thread, must not see; the context's end (ETERM)
        # ends that thread, which closes it.
        monitor = zmq.Socket(sock.context, zmq.PAIR)
        try:
            monitor.connect(address)
            sock.monitor(address, LINK_EVENTS | zmq.EVENT_MONITOR_STOPPED)
        except BaseException:
            monitor.close(linger=0)
            raise
        # Handed over: the caller keeps no reference, and starting a thread is a full memory
        # barrier, which is all ZeroMQ asks of a socket that moves to another thread.
        thread = threading.Thread(target=self._take, args=(monitor, token), name=f"link-watch-{self.peer}",
                                  daemon=True)
        try:
            thread.start()
        except BaseException:
            sock.disable_monitor()  # its last event goes into the connected pipe: no wait
            monitor.close(linger=0)
            raise
        self._sock, self._thread = sock, thread

    def _take(self, monitor: zmq.Socket, token: object) -> None:
        """The watch's thread: take each event of ``monitor`` as it comes, until ZeroMQ stops the
        monitor (:meth:`close`, or the socket's end) or the context ends. It never stops taking
        earlier: an event unread blocks the context's I/O thread."""
        try:
            while True:
                try:
                    frames = monitor.recv_multipart()
                except zmq.ZMQError:  # the context ends
                    return
                try:
                    event = parse_monitor_message(frames)
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        return
                    with self._lock:
                        self.events += 1
                        if self._current is token:
                            self._on(self._seen, event["event"], event["value"])
                except Exception:  # a bug here must not stop the taking
                    _log.exception("link watch: an event of the %s link not understood", self.peer)
        finally:
            monitor.close(linger=0)

    def poll(self) -> bool:
        """Bring :attr:`up`, :attr:`state` and :attr:`refused` up to the events taken; True when
        :attr:`state` changed since the last poll to one worth saying (a CURVE handshake under way
        lasts milliseconds and is not)."""
        with self._lock:
            self.up, self.state, self.refused = self._seen.up, self._seen.state, self._seen.refused
        changed = self.state != self._said and not self._handshaking
        self._said = self.state
        return changed

    def rejoin_due(self) -> bool:
        """True when the owner should replace the socket now (close it, then :meth:`watch` and
        connect a fresh one): the server's authenticator refused its key and the back-off since
        has passed, :data:`REJOIN_FIRST_S` after the first refusal, doubling with each refusal
        of a replacement up to :data:`REJOIN_MAX_S`, back to the first once a handshake goes
        through. Read from the events taken (no :meth:`poll` needed)."""
        with self._lock:
            seen = self._seen
            if seen.refused_at is None or time.monotonic() - seen.refused_at < seen.wait:
                return False
            seen.wait = min(2 * seen.wait, REJOIN_MAX_S)
            seen.refused_at = None  # this socket's turn is taken: the next is the replacement's
            return True

    def why(self, answer: str = "has not answered") -> str:
        """Why a request over the link got no reply, as of now: the link's state where it is down,
        else the state and what the peer did (``answer``: "has not answered", or its own words)."""
        self.poll()
        return self.state if not self.up else f"{self.state}, which {answer}"

    @property
    def _handshaking(self) -> bool:
        return self.state.endswith(HANDSHAKING)

    def _on(self, seen: _Seen, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            seen.up, seen.failed, seen.state = True, False, f"connected to the {self.peer} at {self.endpoint}"
            seen.wait = REJOIN_FIRST_S
        elif event in HANDSHAKE_FAILED:  # kept through the reconnections that try the same handshake again
            seen.up, seen.failed, seen.state = False, True, self._failure(event, value)
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and not seen.refused:
                seen.refused, seen.refused_at = True, time.monotonic()
        elif event == zmq.EVENT_CLOSED:  # a TCP connect that failed: no one listens there
            seen.up, seen.failed, seen.state = False, False, (
                f"nothing answers at {self.endpoint}: is the {self.peer} running there? "
                f"(network.connect_host, network.{self.port_key})")
        elif event == zmq.EVENT_DISCONNECTED and seen.up:
            seen.up, seen.state = False, f"lost the connection to the {self.peer} at {self.endpoint}; reconnecting"
        elif event == zmq.EVENT_CONNECTED and not seen.failed and self.curve:
            seen.state = f"connected to {self.endpoint}, {HANDSHAKING}"

    def _failure(self, event: int, value: int) -> str:
        at = f"the {self.peer} at {self.endpoint}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = f" ({self.curve.client_public_key})" if self.curve else ""
            return (f"{at} refuses this process's CURVE client key{key} (status {value}): its public key is not "
                    f"in the {self.peer}'s authorized_clients")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            here = "on here and off there" if self.curve else "off here and on there"
            return f"{at} does not speak CURVE as this process does: network.curve is {here}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.curve:  # the peer closed: the same for both
            return (f"{at} drops the CURVE handshake: network.curve.server_public_key "
                    f"({self.curve.server_public_key}) is not the public key of the {self.peer}'s server_secret_key, "
                    f"or something other than the {self.peer} listens there")
        why = (f"ZeroMQ protocol error {value:#x}" if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               else os.strerror(value))  # no detail: the errno of the connection's end
        return (f"the handshake with {self.endpoint} fails ({why}): is something other than the {self.peer} "
                f"listening there?")

    def close(self) -> None:
        """Stop watching the current socket (before closing it, or right after) and end the
        watch's thread; once more does nothing."""
        with self._lock:
            self._current = None
        sock, thread, self._sock, self._thread = self._sock, self._thread, None, None
        if sock is None:
            return
        try:
            sock.disable_monitor()  # ZeroMQ's last event to the thread: EVENT_MONITOR_STOPPED
        except zmq.ZMQError:
            pass  # the socket is closed already: ZeroMQ stops its monitor as it ends it
        thread.join(WATCH_JOIN_S)


def keys_main(out: Path, *, overwrite: bool = False) -> int:
    """``reliev3r keys --out DIR``: write the keys and print the matching config section. Exit 2
    where ``--out`` is refused (a file, keys there without ``--force``), as the other commands
    refuse a wrong path; 1 where the keys cannot be written."""
    if out.exists() and not out.is_dir():
        print(f"reliev3r keys: {out}: not a folder", file=sys.stderr)
        return 2
    try:
        files = generate_keys(out, overwrite=overwrite)
    except FileExistsError as err:  # the library's words name its argument; the command's, its flag
        print(f"reliev3r keys: {str(err).replace('pass overwrite=True', 'pass --force')}", file=sys.stderr)
        return 2
    except KeysPartlyReplaced as err:  # a rename failed between others: some keys are new
        print(f"reliev3r keys: cannot write the keys into {out}: {err.strerror} (write the keys again with --force)",
              file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a folder not writable: nothing was replaced
        print(f"reliev3r keys: cannot write the keys into {out}: {err.strerror or err}"
              " (the keys there, if any, are as they were)", file=sys.stderr)
        return 1
    for path in files.values():
        print(path)
    cfg = CurveConfig.from_folder(out)
    print("\n# network.curve section for the config of every stage (secret files stay on their hosts):"
          "\nnetwork:\n  curve:")
    for name in CurveConfig.__slots__:
        value = getattr(cfg, name)
        print(f"    {name}: {str(value).lower() if isinstance(value, bool) else value}")
    return 0
