"""CURVE on real ZeroMQ sockets over 127.0.0.1: authorised clients talk, others get nothing
through and are counted."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from monitoring.metrics import Metrics
from reliev3r import cli, protocol, security
from reliev3r.config import free_port
from reliev3r.security import CurveConfig, generate_keys, secure_client, secure_server
from replay.client import ReplayClient


def _failures(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("reliev3r_auth_failures_total", {"stage": "replay"}) or 0.0


@pytest.fixture()
def server(tmp_path):
    """A CURVE-protected ROUTER echo server on a free port; yields (endpoint, keys folder, metrics, ctx)."""
    keys = tmp_path / "keys"
    generate_keys(keys, clients=("client", "other"))
    (keys / "authorized_clients" / "other.key").unlink()  # 'other' has a valid key pair, not allowed
    ctx = zmq.Context()
    metrics = Metrics("replay")
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    assert secure_server(sock, CurveConfig.from_folder(keys), metrics)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(endpoint)
    yield endpoint, keys, metrics, ctx, sock
    sock.close(linger=0)
    security.stop_authenticator(ctx)
    ctx.destroy(linger=0)


def _request(ctx, endpoint, configure, server_sock, timeout_ms=120_000):
    """Send one request from a fresh DEALER; return what the server received (None if nothing).
    ``timeout_ms`` bounds a hang where something must arrive (polls return once it did); a short
    one only where nothing can arrive (a refused client)."""
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    configure(client)
    client.connect(endpoint)
    try:
        client.send(b"ping")
        if not server_sock.poll(timeout_ms):
            return None, None
        identity, payload = server_sock.recv_multipart()
        server_sock.send_multipart([identity, b"pong:" + payload])
        return payload, client.recv() if client.poll(timeout_ms) else None
    finally:
        client.close(linger=0)


def test_generate_keys_modes_and_layout(tmp_path):
    files = generate_keys(tmp_path / "k")
    for name in ("server_secret", "client_secret"):
        assert stat.S_IMODE(files[name].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert (tmp_path / "k" / "authorized_clients" / "client.key").read_text() == files["client"].read_text()
    assert "secret-key" not in files["server"].read_text()
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path / "k")


def test_keys_replaced_by_a_write_cut_short_stay_whole(tmp_path):
    """A key file was truncated and written in place: a write cut short (a full disk, a crash)
    left it cut, and ``overwrite=True`` destroyed the old key before the new one was whole. A
    process whose files may not grow past 100 bytes (the disk full early) fails to replace the
    keys, says so, and leaves every key file as it was."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    before = {p: p.read_bytes() for p in keys.rglob("*.key*")}
    code = ("import resource, signal, sys\n"
            "from reliev3r.security import generate_keys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "generate_keys(sys.argv[1], overwrite=True)\n")
    cut = subprocess.run([sys.executable, "-c", code, str(keys)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert cut.returncode == 1 and "File too large" in cut.stderr, cut.stderr
    assert {p: p.read_bytes() for p in keys.rglob("*.key*")} == before  # and no temporary file left
    assert CurveConfig.from_folder(keys).enabled


def _pairs_match(keys: Path) -> None:
    """Every key pair in ``keys`` is a pair, and the authorised copy is the client's public key."""
    for name in ("server", "client"):
        public, _ = zmq.auth.load_certificate(str(keys / f"{name}.key"))
        again, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
        assert public == again == zmq.curve_public(secret), name
    assert (keys / "authorized_clients" / "client.key").read_bytes() == (keys / "client.key").read_bytes()


def test_keys_regenerated_all_or_nothing_a_failure_part_way_leaves_every_pair_as_it_was(tmp_path):
    """The keys were replaced one file after the other: a regeneration that failed part way (here
    a file-size limit that a public key passes and a secret does not, as a disk that fills up
    after the first file) left a new server.key beside the old server.key_secret, a pair that
    every stage then failed on. Every new file is now written whole before any is renamed into
    place: the failure leaves every key as it was, and no temporary file."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    before = {p: p.read_bytes() for p in keys.rglob("*") if p.is_file()}
    public, secret = (keys / "server.key").stat().st_size, (keys / "server.key_secret").stat().st_size
    limit = (public + secret) // 2
    assert public < limit < secret  # the first file written passes, its secret does not
    code = ("import resource, signal, sys\n"
            "from reliev3r.security import generate_keys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))\n"
            "generate_keys(sys.argv[1], overwrite=True)\n")
    cut = subprocess.run([sys.executable, "-c", code, str(keys), str(limit)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert cut.returncode == 1 and "File too large" in cut.stderr, cut.stderr
    assert {p: p.read_bytes() for p in keys.rglob("*") if p.is_file()} == before  # no temporary file left either
    _pairs_match(keys)


def test_a_new_keys_folder_is_named_durably_in_its_parent(tmp_path, folder_fsyncs):
    """The keys folder made by mkdir was never flushed in its parent: after a power loss the
    folder, keys and all, could be gone although every file in it was fsynced."""
    flushed = folder_fsyncs(tmp_path, lambda: (tmp_path / "keys").is_dir())
    generate_keys(tmp_path / "keys")
    assert True in flushed
    _pairs_match(tmp_path / "keys")


def test_keys_are_renamed_into_place_durably_and_a_secret_is_never_readable_by_others(tmp_path, monkeypatch,
                                                                                      folder_fsyncs):
    """Every key file is renamed into place whole, with its mode (0600 for a secret, the temporary
    file too, whatever the umask), and each folder flushed once, after every file is renamed, so a
    power loss brings back neither a part nor, for a secret, an earlier key."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    before = {p: p.read_bytes() for p in keys.rglob("*.key*")}
    renamed, real = {}, os.replace

    def replace(src, dst):
        renamed[Path(dst)] = stat.S_IMODE(os.stat(src).st_mode)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    seen = lambda: {p for p in before if p.read_bytes() != before[p]}  # noqa: E731 - the files replaced so far
    flushed = folder_fsyncs(keys, seen)
    allowed = folder_fsyncs(keys / "authorized_clients", seen)
    old = os.umask(0o077)
    try:
        files = generate_keys(keys, overwrite=True)
    finally:
        os.umask(old)
    assert renamed == {**{files[n]: 0o644 for n in ("server", "client")},
                       **{files[n]: 0o600 for n in ("server_secret", "client_secret")},
                       keys / "authorized_clients" / "client.key": 0o644}
    assert flushed == allowed == [set(before)]  # once each, after the last rename
    assert not list(keys.rglob("*.tmp"))


def test_keys_command(tmp_path, capsys):
    assert cli.main(["keys", "--out", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    assert "server.key_secret" in out and "network.curve" in out
    assert CurveConfig.from_folder(tmp_path / "keys").enabled


def test_authorised_client_round_trip(server):
    endpoint, keys, metrics, ctx, sock = server
    cfg = CurveConfig.from_folder(keys)
    got, reply = _request(ctx, endpoint, lambda s: secure_client(s, cfg), sock)
    assert got == b"ping" and reply == b"pong:ping"
    assert _failures(metrics) == 0


def test_unknown_key_refused_counted_and_said(server, caplog):
    endpoint, keys, metrics, ctx, sock = server
    other = CurveConfig(enabled=True, server_public_key=str(keys / "server.key"),
                        server_secret_key=str(keys / "server.key_secret"),
                        client_secret_key=str(keys / "other.key_secret"), client_public_key=str(keys / "other.key"),
                        authorized_clients=str(keys / "authorized_clients"))
    got, _ = _request(ctx, endpoint, lambda s: secure_client(s, other), sock, timeout_ms=1000)
    assert got is None
    deadline = time.monotonic() + 120  # bounds a hang only
    while _failures(metrics) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _failures(metrics) >= 1
    assert "not in authorized_clients" in caplog.text  # said in the server's log, once per key
    # The refusal is exported with the other metrics of the process.
    from prometheus_client import generate_latest

    assert b'reliev3r_auth_failures_total{stage="replay"}' in generate_latest(metrics.registry)
    # The authorised client still gets through afterwards.
    got, reply = _request(ctx, endpoint, lambda s: secure_client(s, CurveConfig.from_folder(keys)), sock)
    assert reply == b"pong:ping"


def _other(keys: Path) -> CurveConfig:
    """The fixture's client 'other': a valid pair whose public key is not in authorized_clients."""
    return CurveConfig(enabled=True, server_public_key=str(keys / "server.key"),
                       server_secret_key=str(keys / "server.key_secret"),
                       client_secret_key=str(keys / "other.key_secret"), client_public_key=str(keys / "other.key"),
                       authorized_clients=str(keys / "authorized_clients"))


def test_a_key_added_to_or_removed_from_authorized_clients_counts_without_a_restart(server, caplog):
    """The authenticator read authorized_clients once, at its start: a key copied in while the
    server ran was refused until the server (streamer, replay) restarted, and a key removed was
    still admitted. The folder is read again when it changes, for the next handshake, and the
    server says which keys it now admits and which no longer."""
    caplog.set_level(logging.INFO, logger="reliev3r.security")  # the processes' level (reliev3r.log)
    endpoint, keys, metrics, ctx, sock = server
    got, _ = _request(ctx, endpoint, lambda s: secure_client(s, _other(keys)), sock, timeout_ms=1000)
    assert got is None  # refused: its key is not there
    deadline = time.monotonic() + 120  # bounds a hang only
    while _failures(metrics) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _failures(metrics) == 1
    (keys / "authorized_clients" / "other.key").write_bytes((keys / "other.key").read_bytes())
    got, reply = _request(ctx, endpoint, lambda s: secure_client(s, _other(keys)), sock)
    assert reply == b"pong:ping"  # a new socket of the same client, the server not restarted
    assert "now admits other.key" in caplog.text
    (keys / "authorized_clients" / "client.key").unlink()
    got, _ = _request(ctx, endpoint, lambda s: secure_client(s, CurveConfig.from_folder(keys)), sock,
                      timeout_ms=1000)
    assert got is None
    deadline = time.monotonic() + 120  # bounds a hang only
    while _failures(metrics) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _failures(metrics) == 2 and "no longer admits client.key" in caplog.text
    got, reply = _request(ctx, endpoint, lambda s: secure_client(s, _other(keys)), sock)
    assert reply == b"pong:ping"


def test_authorized_clients_are_read_again_only_when_the_folder_changes_and_a_bad_file_is_named(server, caplog,
                                                                                                monkeypatch):
    """A handshake reads no key file while the folder is as it was; a file that does not load
    (one half copied) is named and admits nobody, and the keys beside it still count."""
    endpoint, keys, _metrics, ctx, sock = server
    reads, real = [], security.load_certificate
    allowed = keys / "authorized_clients"
    monkeypatch.setattr(security, "load_certificate",  # the server's reads (a client reads its own keys too)
                        lambda path: (Path(path).parent == allowed and reads.append(path)) or real(path))
    for _ in range(2):
        _, reply = _request(ctx, endpoint, lambda s: secure_client(s, CurveConfig.from_folder(keys)), sock)
        assert reply == b"pong:ping"
    assert reads == []
    (keys / "authorized_clients" / "zz.key").write_text("not a certificate\n")
    _, reply = _request(ctx, endpoint, lambda s: secure_client(s, CurveConfig.from_folder(keys)), sock)
    assert reply == b"pong:ping" and len(reads) == 2  # read again once: client.key and zz.key
    assert "zz.key does not load" in caplog.text


def test_a_client_refused_by_curve_is_told_what_to_check(server):
    """A server key that is not the server's (or a client key it does not know) only ever
    looks like silence from the client: its timeout names the key that is wrong, read from
    the socket's events (it said "no insert_ack within the timeout" and nothing else, then
    that a CURVE refusal looks like this, either key)."""
    from replay.client import ReplayClient

    endpoint, keys, _metrics, ctx, _sock = server
    wrong = CurveConfig(enabled=True, server_public_key=str(keys / "other.key"),
                        server_secret_key=str(keys / "server.key_secret"),
                        client_secret_key=str(keys / "client.key_secret"), client_public_key=str(keys / "client.key"),
                        authorized_clients=str(keys / "authorized_clients"))
    client = ReplayClient(endpoint, ctx=ctx, timeout_s=0.5, retry_s=0.25, curve=wrong)
    try:
        with pytest.raises(TimeoutError, match="drops the CURVE handshake: network.curve.server_public_key"):
            client.request(protocol.Message("stats", {}), reply_kinds=("stats",))
    finally:
        client.close()


def test_plain_client_gets_nothing_through(server):
    endpoint, _keys, _metrics, ctx, sock = server
    got, _ = _request(ctx, endpoint, lambda s: None, sock, timeout_ms=1000)
    assert got is None


def test_disabled_curve_changes_nothing():
    ctx = zmq.Context()
    try:
        server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        assert not secure_server(server, CurveConfig(), None)
        assert not secure_client(client, None)
        assert server.getsockopt(zmq.MECHANISM) == zmq.NULL
        server.close(linger=0)
        client.close(linger=0)
    finally:
        ctx.destroy(linger=0)


def test_enabled_config_needs_every_path():
    with pytest.raises(ValueError, match="^server_secret_key"):
        CurveConfig(enabled=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        with pytest.raises(security.SecurityError, match="nonexistent does not exist"):
            secure_client(sock, CurveConfig(enabled=True, server_secret_key="x", server_public_key="/nonexistent",
                                            client_secret_key="/nonexistent", client_public_key="x",
                                            authorized_clients="x"))
    finally:
        sock.close(linger=0)
        ctx.destroy(linger=0)


def test_keys_that_exist_are_kept_unless_forced(tmp_path, capsys):
    """A second `reliev3r keys` into the same folder keeps the keys and names the flag that
    replaces them (it named the library's argument, overwrite=True), exit 2 as the other
    commands refuse what they are given (it was 1)."""
    assert cli.main(["keys", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "server.key_secret").read_bytes()
    capsys.readouterr()
    assert cli.main(["keys", "--out", str(tmp_path)]) == 2
    assert "pass --force" in capsys.readouterr().err and (tmp_path / "server.key_secret").read_bytes() == before
    assert cli.main(["keys", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "server.key_secret").read_bytes() != before


def test_keys_refuse_to_replace_a_client_host_s_pair_unless_forced(tmp_path, capsys):
    """A labeler host holds its client pair and the server's public key, not the server's
    secret (as the keys' layout advises): a second `reliev3r keys` there replaced both
    silently, and the host's new server key no longer matched its server."""
    assert cli.main(["keys", "--out", str(tmp_path)]) == 0
    (tmp_path / "server.key_secret").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.key*")}
    capsys.readouterr()
    assert cli.main(["keys", "--out", str(tmp_path)]) == 2
    said = capsys.readouterr().err
    assert "client.key" in said and "pass --force" in said
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.key*")} == before


def test_keys_into_a_file_or_a_folder_that_cannot_be_written_get_one_line(tmp_path, capsys, monkeypatch):
    """`reliev3r keys --out` naming a file said "[Errno 17] File exists" (read as keys that exist),
    and a write that failed (a full disk) ended in a traceback; each is now one line: exit 2 for the
    file (a wrong path, as the other commands refuse one; it was 1), 1 for the write."""
    (tmp_path / "file").write_text("x")
    assert cli.main(["keys", "--out", str(tmp_path / "file")]) == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "not a folder" in said and "--force" not in said

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(security.durable, "write_temporary", full)
    assert cli.main(["keys", "--out", str(tmp_path / "k")]) == 1
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "cannot write the keys" in said and os.strerror(errno.ENOSPC) in said
    assert "as they were" in said and not list((tmp_path / "k").rglob("*.key*"))


def test_keys_whose_rename_fails_part_way_say_a_pair_may_not_match(tmp_path, capsys, monkeypatch):
    """The one failure that can still leave a new key beside an old one, a rename failing after
    others went through, is said as such (the command said so for every failure, which after a
    full disk is now wrong: nothing was replaced)."""
    assert cli.main(["keys", "--out", str(tmp_path)]) == 0
    renamed, real = [], os.replace

    def replace(src, dst):
        if len(renamed) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        renamed.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    assert cli.main(["keys", "--out", str(tmp_path), "--force"]) == 1
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and os.strerror(errno.EIO) in said and "may not match" in said, said
    assert "--force" in said and not list(tmp_path.rglob("*.tmp"))


def test_an_unreadable_authorised_key_is_named_at_start(tmp_path):
    """One damaged file in authorized_clients made the server load no key at all (the library
    logs it and goes on): every client, the authorised too, was refused without a word."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    (keys / "authorized_clients" / "zz.key").write_text("not a certificate\n")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(security.SecurityError, match="zz.key"):
            secure_server(sock, CurveConfig.from_folder(keys), Metrics("replay"))
    finally:
        sock.close(linger=0)
        security.stop_authenticator(ctx)
        ctx.destroy(linger=0)


def _curve_overrides(keys) -> list[str]:
    cfg = CurveConfig.from_folder(keys)
    return [f"network.curve.{name}={str(getattr(cfg, name)).lower() if name == 'enabled' else getattr(cfg, name)}"
            for name in CurveConfig.__slots__]


def test_a_missing_key_file_stops_a_stage_or_up_at_once_naming_its_key(tmp_path):
    """A key file that is not there (a typo, a file left on another host) failed the stage after
    its start, teacher loaded, with a traceback in a log line (exit 1); `up` printed a Python
    traceback. Now the process says which key names which missing file, starts nothing, exit 2.
    A host needs only its side's files: a labeler host holds no server secret."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    (keys / "server.key_secret").unlink()  # a client host: the server's secret stays on the server's host
    base = [*_curve_overrides(keys), f"network.work_port={free_port()}", f"network.replay_port={free_port()}",
            "monitoring.enabled=false", "labeler.teacher=none"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reliev3r.cli", *args, *base], cwd=cli.DEFAULT_CONFIG.parents[1],
                              capture_output=True, text=True, timeout=120)

    # The replay (a server) needs the server secret: named, nothing started.
    done = run("replay", f"run.dir={tmp_path / 'replay'}")
    assert done.returncode == 2, done.stderr
    assert "network.curve.server_secret_key" in done.stderr and "server.key_secret does not exist" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "replay").exists()
    # `up` serves and connects: the same, before anything starts.
    done = run("up", f"run.dir={tmp_path / 'up'}")
    assert done.returncode == 2, done.stderr
    assert "network.curve.server_secret_key" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "up").exists()
    # A labeler (a client) is refused for its own missing file, not for the server's secret.
    (keys / "client.key_secret").unlink()
    done = run("label", f"run.dir={tmp_path / 'label'}")
    assert done.returncode == 2, done.stderr
    assert "network.curve.client_secret_key" in done.stderr and "client.key_secret does not exist" in done.stderr
    assert "server_secret_key" not in done.stderr and "Traceback" not in done.stderr


def test_a_link_watch_tells_why_a_connecting_socket_gets_nothing(server, ctx):
    """Nothing listening, a server public key that is not the server's, a client key the server
    does not know and CURVE off on the client all look like silence to the application; the
    socket's events tell them apart, and a link that gets through is up."""
    endpoint, keys, _metrics, _ctx, _sock = server
    right = CurveConfig.from_folder(keys)
    fields = {name: getattr(right, name) for name in CurveConfig.__slots__}
    cases = {  # (endpoint, client keys) -> what the state must name
        "nothing there": (f"tcp://127.0.0.1:{free_port()}", right, "nothing answers at tcp://127.0.0.1:"),
        "wrong server key": (endpoint, CurveConfig(**{**fields, "server_public_key": str(keys / "other.key")}),
                             "network.curve.server_public_key"),
        "unknown client": (endpoint, CurveConfig(**{**fields, "client_secret_key": str(keys / "other.key_secret"),
                                                    "client_public_key": str(keys / "other.key")}),
                           "not in the replay's authorized_clients"),
        "no CURVE here": (endpoint, None, "network.curve is off here and on there"),
        "right": (endpoint, right, "connected to the replay"),
    }
    other = socket.create_server(("127.0.0.1", 0))  # a program that is no ZeroMQ peer: it hangs up at once
    cases["something else"] = (f"tcp://127.0.0.1:{other.getsockname()[1]}", None,
                               "is something other than the replay listening there?")

    def hang_up() -> None:
        try:
            while True:
                other.accept()[0].close()
        except OSError:  # closed at the end of the test
            pass

    threading.Thread(target=hang_up, daemon=True).start()
    for name, (address, curve, said) in cases.items():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock, curve)
        watch = security.LinkWatch(address, "replay", "replay_port", curve)
        watch.watch(sock)
        sock.connect(address)
        try:
            deadline = time.monotonic() + 60  # bounds a hang only: one connection attempt tells
            while said not in watch.state and time.monotonic() < deadline:
                watch.poll()
                time.sleep(0.01)
            assert said in watch.state, (name, watch.state)
            assert watch.up == (name == "right") and watch.refused == (name == "unknown client")
        finally:
            watch.close()
            sock.close(linger=0)
    other.close()


def test_a_link_watch_never_stalls_its_context_however_long_it_is_not_polled(ctx):
    """ZeroMQ sends a socket's monitor events from its context's I/O thread, blocking once about
    2,000 lie unread; that I/O thread then serves no socket of the context. A peer that is down
    gives an event per reconnection attempt, and the watch read them only in :meth:`poll`: a
    socket whose owner did not poll it (the learner's priority reporter while replay was down)
    stalled every link of the process for good, its peer back or not. The watch takes the events
    as they come; here a reconnection every millisecond to a port nobody listens on, never polled."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    live = ctx.socket(zmq.DEALER)
    live.setsockopt(zmq.LINGER, 0)
    live.connect(f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}")
    dead = ctx.socket(zmq.DEALER)
    dead.setsockopt(zmq.LINGER, 0)
    dead.setsockopt(zmq.RECONNECT_IVL, 1)
    address = f"tcp://127.0.0.1:{free_port()}"
    watch = security.LinkWatch(address, "replay", "replay_port", None)
    watch.watch(dead)
    dead.connect(address)
    try:
        deadline = time.monotonic() + 120  # bounds a hang only: the count grows with every reconnection
        while watch.events <= 2500 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watch.events > 2500, watch.events
        live.send(b"still there")
        assert router.poll(60_000), "the context no longer delivers"  # bounds a hang only
        assert router.recv_multipart()[1] == b"still there"
        assert watch.poll() and "nothing answers at" in watch.state and not watch.up
        assert not watch.poll()  # said once
    finally:
        watch.close()
        dead.close(linger=0)
        live.close(linger=0)
        router.close(linger=0)


def _watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("link-watch") and t.is_alive()]


def test_a_replay_client_s_retries_leave_one_watching_thread(ctx):
    """Every retry of a :class:`ReplayClient` replaces its socket; the watch of the old one ends
    with it (its thread is joined), so the threads do not pile up, and closing leaves none."""
    assert not _watchers()
    client = ReplayClient(f"tcp://127.0.0.1:{free_port()}", ctx=ctx, timeout_s=0.2, retry_s=0.02)
    deadline = time.monotonic() + 60  # bounds a hang only
    while client.retries < 10 and time.monotonic() < deadline:
        with pytest.raises(TimeoutError, match="nothing answers at|no connection to"):
            client.stats()
    assert client.retries >= 10
    assert len(_watchers()) == 1
    client.close()
    assert not _watchers()
    client.close()  # again: nothing to do


def test_a_link_watch_closes_after_its_socket(ctx):
    """An owner may close the socket first: the watch's thread still ends (ZeroMQ stops a closed
    socket's monitor), and closing twice is harmless."""
    sock = ctx.socket(zmq.DEALER)
    address = f"tcp://127.0.0.1:{free_port()}"
    watch = security.LinkWatch(address, "replay", "replay_port", None)
    watch.watch(sock)
    sock.connect(address)
    sock.close(linger=0)
    watch.close()
    assert not _watchers()
    watch.close()


def _first_log_line(proc, text: str, bound_s: float, what: str, wait_for) -> tuple[str, dict]:
    """The first line of ``proc``'s log (its stderr) holding ``text``, and its JSON record."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    line = wait_for(lambda: next((x for x in lines if text in x), None), bound_s, what, [proc])
    return line, json.loads(line)


def test_a_labeler_that_cannot_reach_its_streamer_says_why(server, tmp_path, reliev3r_process, wait_for):
    """A labeler whose streamer link never comes up (here: a server public key that is not the
    streamer's, which the streamer cannot even count as a refusal) logged "labeler up" and then
    nothing, for ever. It now says what it waits for and why (the reasons: the test above). The
    fixture's CURVE ROUTER stands in for the streamer's work socket."""
    endpoint, keys, _metrics, _ctx, _sock = server
    proc = reliev3r_process("label", *_curve_overrides(keys), f"network.work_port={endpoint.rsplit(':', 1)[1]}",
                            f"network.replay_port={free_port()}", "monitoring.enabled=false", "labeler.teacher=none",
                            f"run.dir={tmp_path / 'run'}", f"network.curve.server_public_key={keys / 'other.key'}",
                            stderr=subprocess.PIPE, text=True)
    # 60 s bounds a hang only: the reason is known within one connection attempt of a started labeler.
    line, record = _first_log_line(proc, "waiting for the streamer", 60, "the labeler's word on its streamer link",
                                   wait_for)
    assert record["level"] == "WARNING" and record["endpoint"] == endpoint, line
    assert "network.curve.server_public_key" in record["reason"] and "other.key" in record["reason"], line


def test_a_learner_waiting_for_replay_says_why(server, tmp_path, reliev3r_process, wait_for):
    """A learner whose client key the replay does not know logged "waiting for replay" with the
    endpoint every few seconds, for ever, as if replay were merely slow or absent: the reason its
    replay client knew was dropped. The line now carries it. The fixture's CURVE ROUTER stands
    in for the replay."""
    endpoint, keys, _metrics, _ctx, _sock = server
    proc = reliev3r_process("learn", *_curve_overrides(keys), f"network.replay_port={endpoint.rsplit(':', 1)[1]}",
                            "monitoring.enabled=false", "learner.device=cpu", "learner.threads=1",
                            f"run.dir={tmp_path / 'run'}", f"network.curve.client_public_key={keys / 'other.key'}",
                            f"network.curve.client_secret_key={keys / 'other.key_secret'}",
                            stderr=subprocess.PIPE, text=True)
    # 120 s bounds a hang only: the line comes one sample timeout after the learner is up.
    line, record = _first_log_line(proc, "waiting for replay", 120, "the learner's word on its replay link", wait_for)
    assert record["endpoint"] == endpoint and "not in the replay's authorized_clients" in record["reason"], line
    assert "other.key" in record["reason"], line


def test_a_labeler_refused_by_its_streamer_stops_on_sigterm(server, tmp_path, reliev3r_process, wait_for):
    """A client key the streamer refuses ends that socket's link (ZeroMQ drops its queue and does
    not reconnect), so the labeler's next keep-alive ``ready`` blocked in its send: SIGTERM
    and Ctrl-C were logged and never acted on, and only SIGKILL ended it. Its sends to the
    streamer no longer block; it stops as any labeler does."""
    endpoint, keys, metrics, _ctx, _sock = server
    proc = reliev3r_process("label", *_curve_overrides(keys), f"network.work_port={endpoint.rsplit(':', 1)[1]}",
                            f"network.replay_port={free_port()}", "monitoring.enabled=false", "labeler.teacher=none",
                            f"run.dir={tmp_path / 'run'}", f"network.curve.client_public_key={keys / 'other.key'}",
                            f"network.curve.client_secret_key={keys / 'other.key_secret'}",
                            "labeler.ready_interval_s=0.1", stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    # Bounds a hang only: the refusal comes with the first connection, after the labeler is up.
    wait_for(lambda: _failures(metrics) >= 1 and any('"labeler up"' in x for x in lines), 60,
             "the streamer's refusal of the labeler", [proc])
    time.sleep(1.0)  # ten keep-alives: the third blocked. Not an assertion: the stop must come whatever the wait
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)  # bounds a hang only
    except subprocess.TimeoutExpired:
        pytest.fail("the refused labeler did not stop on SIGTERM: " + "".join(lines)[-2000:])
    assert proc.returncode == 0, "".join(lines)[-2000:]


def test_a_labeler_refused_by_its_streamer_joins_once_its_key_is_authorised(server, tmp_path, reliev3r_process,
                                                                            wait_for):
    """ZeroMQ never tries a refused CURVE handshake again on that socket (measured on libzmq
    4.3.5: after HANDSHAKE_FAILED_AUTH the DEALER disconnects, reconnects no more, and takes no
    message), so a labeler whose key was not yet authorised waited for ever, until restarted.
    It now replaces its refused socket after a back-off: once the key is copied into the
    streamer's authorized_clients (read again there, no restart), the same labeler process
    connects and asks for windows. The fixture's CURVE ROUTER stands in for the streamer."""
    endpoint, keys, metrics, _ctx, sock = server
    proc = reliev3r_process("label", *_curve_overrides(keys), f"network.work_port={endpoint.rsplit(':', 1)[1]}",
                            f"network.replay_port={free_port()}", "monitoring.enabled=false", "labeler.teacher=none",
                            f"run.dir={tmp_path / 'run'}", f"network.curve.client_public_key={keys / 'other.key'}",
                            f"network.curve.client_secret_key={keys / 'other.key_secret'}",
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    # Bounds a hang only: the refusal comes with the first connection, after the labeler is up.
    wait_for(lambda: _failures(metrics) >= 1, 60, "the streamer's refusal of the labeler", [proc])
    assert not sock.poll(0)  # refused: nothing came through
    (keys / "authorized_clients" / "other.key").write_bytes((keys / "other.key").read_bytes())
    # 120 s bounds a hang only: the labeler tries again 5 s after the refusal (then 10, 20, 30 s).
    got = wait_for(lambda: sock.poll(200) and sock.recv_multipart(), 120, "the labeler's ready", [proc])
    assert protocol.decode(got[1:]).kind == "ready"
    wait_for(lambda: any("connected to the streamer" in x for x in lines), 60, "the labeler's word", [proc])
    said = [json.loads(x) for x in lines if "waiting for the streamer" in x]
    assert said and "tries again" in said[0]["reason"] and "restart" not in said[0]["reason"], said


def test_a_refused_link_is_replaced_after_a_back_off_that_grows_to_thirty_seconds(server, ctx, monkeypatch):
    """:meth:`LinkWatch.rejoin_due` says when to replace a socket the server refused: 5 s after
    the refusal, then each replacement refused again waits twice as long, up to 30 s, and a
    handshake that goes through brings it back to 5 s. The clock is the watch's own, set here."""
    endpoint, keys, _metrics, _ctx, _sock = server
    now = [1000.0]
    monkeypatch.setattr(security, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    watch = security.LinkWatch(endpoint, "streamer", "work_port", _other(keys))

    def join(refused: bool = True) -> zmq.Socket:
        """A fresh socket of the link, once the server refused it (or, ``refused=False``, let it in)."""
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock, _other(keys))
        watch.watch(sock)
        sock.connect(endpoint)
        deadline = time.monotonic() + 60  # bounds a hang only: one handshake tells
        while (watch.refused if refused else watch.up) is False and time.monotonic() < deadline:
            watch.poll()
            time.sleep(0.01)
        return sock

    def back_off() -> float:
        """The wait rejoin_due asks of the socket just refused, in whole seconds."""
        assert watch.refused and not watch.rejoin_due()
        start, waited = now[0], 0
        while not watch.rejoin_due():
            waited += 1
            now[0] = start + waited
        assert not watch.rejoin_due()  # one replacement per refusal
        return waited

    sockets = []
    try:
        waits = []
        for _ in range(5):
            sockets.append(join())
            waits.append(back_off())
        assert waits == [5, 10, 20, 30, 30]
        (keys / "authorized_clients" / "other.key").write_bytes((keys / "other.key").read_bytes())
        sockets.append(join(refused=False))
        assert watch.up and not watch.refused and not watch.rejoin_due()
        (keys / "authorized_clients" / "other.key").unlink()
        sockets.append(join())
        assert back_off() == 5
    finally:
        watch.close()
        for sock in sockets:
            sock.close(linger=0)
