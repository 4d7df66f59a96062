"""Ports on one host: 0 becomes a free port, an explicit port must be free before anything starts.

``reliev3r up`` resolves every ZeroMQ and metrics port of its run at once (:func:`resolve`):
the ports left at 0 (the defaults) get free ones, so two runs share a host, and an explicit
port that another program holds stops it before any process starts, with a message naming the
port and the key that sets it (instead of ``Address already in use`` deep in a stage). The
resolved ports go to ``<run.dir>/config.yaml``, which every child reads, and to
``<run.dir>/processes.json``. A stage started on its own (``reliev3r stream`` ...) checks its
own ports (:func:`stage_problem`): its peers must know them, so the ZeroMQ ones cannot be 0;
several labelers of one host each need their own metrics port (``monitoring.ports.labeler`` per
process), which a refused one is told.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from monitoring.config import RANKED, MonitoringConfig
from reliev3r.config import PipelineConfig
from reliev3r.config_base import local_rank

NETWORK_PORTS = ("work_port", "replay_port", "supervisor_port")
STAGE_PORTS = {"streamer": ("work_port",), "labeler": ("work_port", "replay_port"), "replay": ("replay_port",),
               "learner": ("replay_port",), "evaluator": ()}
"""The ZeroMQ ports each stage binds or connects to."""
BINDS = {"streamer": "work_port", "replay": "replay_port"}
SEVERAL = "labeler"
"""The stage a host may run several processes of by hand (``reliev3r label`` each, one per GPU):
each needs a metrics port of its own, given by its own ``monitoring.ports.labeler`` override
(``reliev3r up`` gives its extra labelers theirs, ``labeler-K``)."""


class PortError(RuntimeError):
    """A port cannot be used; the message names it and the key that sets it."""


def _socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # As ZeroMQ and the metrics server bind: a port left in TIME_WAIT by a finished run is free.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def in_use(host: str, port: int) -> bool:
    """True when ``port`` cannot be bound on ``host`` (another socket listens there)."""
    with _socket(host) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def taken_message(key: str, host: str, port: int) -> str:
    return (f"{key}: port {port} on {host} is already in use (another reliev3r run or program holds it); "
            f"set {key}=0 for a free port, or {key}=<another port>")


def resolve(cfg: PipelineConfig, metrics_names: list[str]) -> dict[str, int]:
    """Give every port of a local run a number, in place: the network ports and the metrics
    port of each name in ``metrics_names`` (the supervisor and its children). Explicit ports
    are checked first (free, and not given twice); then the free ones are chosen together, each
    held until all are chosen, so no two are the same. Returns {key: port}; raises
    :class:`PortError` naming the first explicit port that cannot be used."""
    net, mon = cfg.network, cfg.monitoring
    wanted: list[tuple[str, str, int]] = [(f"network.{n}", net.host, getattr(net, n)) for n in NETWORK_PORTS]
    if mon.enabled:
        wanted += [(f"monitoring.ports.{n}", mon.host, mon.ports.get(n, 0)) for n in metrics_names]
    seen: dict[int, str] = {}
    for key, host, port in wanted:
        if not port:
            continue
        if port in seen:
            raise PortError(f"{key}: port {port} is also {seen[port]}; give each its own port, or 0 for a free one")
        seen[port] = key
        if in_use(host, port):
            raise PortError(taken_message(key, host, port))
    held: list[socket.socket] = []
    out: dict[str, int] = {}
    try:
        for key, host, port in wanted:
            if not port:
                sock = _hold_free_port(host)
                held.append(sock)
                port = sock.getsockname()[1]
            out[key] = port
    finally:
        for sock in held:
            sock.close()
    for key, port in out.items():
        section, _, name = key.partition(".")
        if section == "network":
            setattr(net, name, port)
        else:
            mon.ports[name.split(".", 1)[1]] = port
    return out


FREE_PORT_FLOOR = 10000
"""Lowest port :func:`resolve` picks for a port left at 0."""
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int | None:
    """First port of the kernel's range for outgoing connections (Linux), or None."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _hold_free_port(host: str, tries: int = 200) -> socket.socket:
    """A socket bound (without SO_REUSEADDR) to a port nothing else has bound, to be closed by
    the caller once every port is chosen.

    The port is picked below the kernel's ephemeral range where there is one: a port the
    kernel hands out for binding to 0 lies inside that range, and between ``resolve`` and the
    child stage's own bind any outgoing connection on the host (ZeroMQ peers of other runs,
    scrapers) may take it as its source port; a stage then failed on every restart with
    ``Address already in use`` (seen with four runs on one GPU host). Falls back to the
    kernel's choice where no range is known or nothing below it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    candidates = []
    if low is not None and low - FREE_PORT_FLOOR >= 1000:
        rng = random.Random()
        candidates = [rng.randrange(FREE_PORT_FLOOR, low) for _ in range(tries)]
    for port in [*candidates, 0]:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        return sock
    raise PortError(f"no free port on {host}")


def stage_problem(stage: str, instance: str, cfg: PipelineConfig) -> str | None:
    """Why a stage started on its own cannot run with these ports, or None: a ZeroMQ port it
    uses left at 0 (its peers could not find it), or a port it binds already in use."""
    net, mon = cfg.network, cfg.monitoring
    for name in STAGE_PORTS.get(stage, ()):
        if not getattr(net, name):
            return (f"network.{name} is 0, a free port that only `reliev3r up` can choose and pass to the "
                    f"other stages; a stage started on its own needs the port its peers use, e.g. "
                    f"network.{name}={5701 + NETWORK_PORTS.index(name)} (deploy/ sets 5701-5703)")
    if stage in BINDS and in_use(net.host, port := getattr(net, BINDS[stage])):
        return taken_message(f"network.{BINDS[stage]}", net.host, port)
    try:
        rank = local_rank() if stage == RANKED else 0  # only the learner runs as ranks
    except ValueError as err:  # a LOCAL_RANK that is no rank
        return str(err)
    key = mon.key(stage, instance)
    if mon.enabled and (port := mon.port_of(stage, instance, rank)) and in_use(mon.host, port):
        return metrics_taken_message(mon, key, port, rank)
    return None


def metrics_taken_message(mon: MonitoringConfig, key: str, port: int, rank: int) -> str:
    """:func:`taken_message` for a metrics port, naming the other process of this host it may be:
    a learner rank serves on the fixed ``learner`` port plus its LOCAL_RANK, which on one host
    must be no other process's port; a labeler's may be another labeler's (:data:`SEVERAL`)."""
    learner = mon.ports.get(RANKED, 0)
    advice = (f"on one host, give monitoring.ports.{RANKED} a port with one free port above it per further "
              f"rank (deploy/prometheus/local-ports.yaml puts it above every other), or 0 for free ones")
    if key == RANKED and rank:
        others = [f"monitoring.ports.{k}" for k, p in mon.ports.items() if p == port and k != key]
        whose = (f"it is also the port of {' and '.join(others)}" if others
                 else "another reliev3r run or program holds it")
        return (f"monitoring.ports.{RANKED} ({learner}) + LOCAL_RANK {rank}: port {port} on {mon.host}, this "
                f"rank's, is already in use ({whose}); {advice}")
    if key == SEVERAL:
        message = (f"monitoring.ports.{key}: port {port} on {mon.host} is already in use (another labeler of this "
                   f"host, another reliev3r run or a program holds it); each labeler of one host needs its own "
                   f"metrics port: start this one with monitoring.ports.{key}=<another port> (the one its scraper "
                   f"is given), or monitoring.ports.{key}=0 for a free one (its log names it)")
    else:
        message = taken_message(f"monitoring.ports.{key}", mon.host, port)
    if key != RANKED and learner and port > learner:
        message += (f"; if the learner runs ranks on this host, it is rank {port - learner}'s "
                    f"(monitoring.ports.{RANKED} ({learner}) + LOCAL_RANK {port - learner}): {advice}")
    return message
