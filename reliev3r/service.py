"""What every long-running process shares: signals, logs, metrics, heartbeats, a ZMQ context.

A stage's ``run(cfg, runtime)`` loops ``while not runtime.stopping`` and polls its sockets
with a short timeout, so SIGTERM/SIGINT end it within one poll interval and it can close
cleanly (flush, ack, snapshot) before returning.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Protocol

import zmq

from monitoring.config import RANKED
from monitoring.metrics import Metrics
from reliev3r import log as rlog
from reliev3r import protocol, security
from reliev3r.config import PipelineConfig
from reliev3r.config_base import local_rank

HEARTBEAT_S = 1.0
FEEDERS = ("streamer", "labeler", "evaluator")
"""The stages ``run.feeder_nice`` lowers: they feed the learner and share its host."""
_PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """Under ``reliev3r up`` (RELIEV3R_SUPERVISED holds the supervisor's pid), ask the kernel
    to SIGTERM this process when the supervisor dies, even by SIGKILL: no orphans."""
    parent = os.environ.get("RELIEV3R_SUPERVISED")
    if not parent or not parent.isdigit():
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux/glibc: a SIGKILLed supervisor may leave children behind
    if os.getppid() != int(parent):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def place(stage: str, cfg: PipelineConfig) -> None:
    """This process's CPU priority: ``run.feeder_nice`` for the stages that feed the learner."""
    if stage in FEEDERS and cfg.run.feeder_nice:
        os.nice(cfg.run.feeder_nice)


class Runtime:
    """Process-wide services for one stage. Use as a context manager."""

    def __init__(self, stage: str, cfg: PipelineConfig, *, install_signals: bool = True,
                 serve_metrics: bool | None = None):
        self.stage = stage
        self.instance = os.environ.get("RELIEV3R_INSTANCE", stage)
        """This process's name under the supervisor: the stage, or e.g. ``labeler-1``."""
        self.cfg = cfg
        if install_signals:  # before any thread starts: threads inherit it
            place(stage, cfg)
        self.log = rlog.setup(stage, cfg.run.log_level) if install_signals else logging.getLogger(f"reliev3r.{stage}")
        protocol.self_test()
        self.ctx = zmq.Context()
        self.metrics = Metrics(stage)
        self.rejected = ""
        """The reason of the last message :meth:`receive` rejected (a server tells its sender)."""
        self.status: dict[str, Any] = {}
        """Small plain values the supervisor shows in its status line (updated by the stage)."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            die_with_supervisor()
        mon = cfg.monitoring
        self.metrics_port: int | None = None
        """The port its metrics endpoint is bound to (None: not served)."""
        if mon.enabled if serve_metrics is None else serve_metrics:
            rank = local_rank() if stage == RANKED else 0  # one port per rank of a torchrun learner
            port = mon.port_of(stage, self.instance, rank)
            self.metrics_port = self.metrics.serve(mon.host, port)
            self.log.info("metrics endpoint up", extra={"url": f"http://{mon.host}:{self.metrics_port}/metrics"})
        if cfg.network.supervisor_port and os.environ.get("RELIEV3R_SUPERVISED"):
            self.spawn(self._heartbeat_loop, "heartbeat")

    # ------------------------------------------------------------------ lifecycle
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was asked meanwhile."""
        return self._stop.wait(seconds)

    def _on_signal(self, signum, _frame) -> None:
        self.log.info("stopping on signal", extra={"signal": signal.Signals(signum).name})
        self._stop.set()

    def spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Run ``target`` in a daemon thread that is joined at close."""
        thread = threading.Thread(target=target, name=f"{self.stage}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.metrics.up.set(0)
        self.metrics.close()
        security.stop_authenticator(self.ctx)
        self.ctx.destroy(linger=0)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ heartbeat
    def _heartbeat_loop(self) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)
        security.secure_client(sock, self.cfg.network.curve)
        sock.connect(self.cfg.network.connect(self.cfg.network.supervisor_port))
        def beat() -> None:
            meta = {"stage": self.instance, "pid": os.getpid(), "time": time.time(), "status": dict(self.status)}
            try:
                sock.send_multipart(protocol.encode(protocol.Message("heartbeat", meta)), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # supervisor busy or gone; the next beat will try again

        linger = 0
        try:
            while not self._stop.wait(HEARTBEAT_S):
                beat()
            # Stopping: the stage's work is over (close() runs after it returns), so this beat
            # carries its final status; given half a second to leave before the socket goes.
            beat()
            linger = 500
        finally:
            sock.close(linger=linger)

    # ------------------------------------------------------------------ receiving
    def receive(self, sock: zmq.Socket, *, kinds: tuple[str, ...], routed: bool = False,
                max_bytes: int = protocol.DEFAULT_MAX_BYTES):
        """Read one multipart message; return ``(identity, Message)`` or ``(identity, None)``
        when it was malformed (counted by reason and logged; the caller carries on).
        ``routed``: the socket is a ROUTER, so the first frame is the peer identity."""
        frames = sock.recv_multipart(copy=False)
        identity = None
        if routed:
            identity, frames = frames[0].bytes, frames[1:]
        try:
            return identity, protocol.decode(frames, max_bytes=max_bytes, kinds=kinds)
        except protocol.ProtocolError as err:
            self.rejected = err.reason
            self.metrics.reject(err.reason)
            self.log.warning("rejected message", extra={"reason": err.reason, "detail": str(err)})
            return identity, None


class Stage(Protocol):
    """A stage's service object (ARCHITECTURE.md, "Where a change goes")."""

    def step(self) -> int | None:
        """One unit of work; an exit status once the stage's work is over, else None."""

    def close(self) -> None:
        """Release what the constructor opened."""


def serve(stage: Stage, runtime: Runtime) -> int:
    """The loop of a stage's ``run``: ``stage.step()`` until a stop is asked (exit status 0) or
    a step returns an exit status; ``stage.close()`` either way."""
    try:
        while not runtime.stopping:
            if (rc := stage.step()) is not None:
                return rc
        return 0
    finally:
        stage.close()
