"""The configuration machinery and the sections every process shares; imports no stage.

Each component keeps its own ``@dataclass(kw_only=True, slots=True)`` config beside its code
(``streamer/config.py``, ``learner/config.py`` ...); :mod:`reliev3r.config` composes them into
the :class:`~reliev3r.config.PipelineConfig` (the application layer, ARCHITECTURE.md). Here:
building a dataclass from plain data strictly (:func:`build`: an unknown key, a wrong type or
a value outside a ``Literal`` is a :class:`ConfigError` that names the full dotted key, e.g.
``learner.lr: expected float, got 'fast'``), YAML files and ``key.sub=value`` overrides
(:func:`load_data`, :func:`with_overrides`), the ``run`` and ``network`` sections (with the
CURVE keys) that every process reads, and the one reader each of a process's rank on its host
(:func:`local_rank`) and of how many ranks there are (:func:`world_size`). Plain data:
importable without pyzmq (GPU hosts may lack it).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


DEVICE = re.compile(r"cpu|cuda(:\d+)?")
"""The torch devices a stage's ``device`` key may name: ``cpu``, ``cuda`` (the GPU is picked
for it: the learner's is its ``LOCAL_RANK``'s, ``reliev3r up`` spreads the labelers over the
host's) or ``cuda:N``."""


def local_rank() -> int:
    """This process's rank among the ranks of its host: torchrun's ``LOCAL_RANK``, 0 without.
    The one reader of it: it picks a learner rank's GPU (``cuda``, :data:`DEVICE`) and its
    metrics port (``monitoring.ports.learner`` plus it). A value that is no rank (``one``,
    ``-1``) is a ``ValueError`` naming the variable."""
    return _torchrun_count("LOCAL_RANK", 0, "a rank")


def world_size() -> int:
    """How many ranks the learner runs as: torchrun's ``WORLD_SIZE``, 1 without. The one reader
    of it: above 1, a learner rank joins the process group (``learner.train.init_distributed``).
    A value that is no count of ranks (``two``, ``0``, ``-1``) is a ``ValueError`` naming the
    variable."""
    return _torchrun_count("WORLD_SIZE", 1, "a count of ranks")


def _torchrun_count(name: str, least: int, what: str) -> int:
    """The integer torchrun sets in the environment variable ``name``, ``least`` where unset;
    ValueError naming it where it is no integer >= ``least``."""
    value = os.environ.get(name)
    if value is None:
        return least
    if not value.strip().isdecimal() or int(value) < least:
        raise ValueError(f"{name} must be {what} (an integer >= {least}, as torchrun sets it), got {value!r}")
    return int(value)


def check_device(name: str, value: str, *, auto: bool = False) -> None:
    """Refuse a ``device`` value that names no device (``gpu``, ``cuda0``), which torch would
    refuse only once the stage has started. Whether the device is present is not checked: a
    config written on one host often runs on another. ``auto``: ``auto`` is accepted too (for a
    stage that resolves it; the learner: cuda when present, else cpu). A ``ValueError`` whose
    message starts with ``name``, as ``__post_init__`` checks raise (:func:`build` adds the
    section)."""
    if not (auto and value == "auto") and not DEVICE.fullmatch(value):
        choices = "'auto', 'cpu', 'cuda' or 'cuda:N'" if auto else "'cpu', 'cuda' or 'cuda:N'"
        raise ValueError(f"{name} must be {choices}, got {value!r}")


def present_devices() -> list[str]:
    """The devices of this host as a ``device`` value names them: ``cpu``, then ``cuda:0`` ..
    (those torch sees: ``CUDA_VISIBLE_DEVICES`` applies; none where torch has no CUDA)."""
    import torch  # here: the config machinery loads without torch

    return ["cpu", *(f"cuda:{k}" for k in range(torch.cuda.device_count()))]


def check_device_present(name: str, value: str, *, rank: int = 0) -> None:
    """Refuse a device value (``cpu``, ``cuda``, ``cuda:N``) that names no device or one this host
    does not have, with a ``ValueError`` that starts with ``name`` and the value and says which
    devices there are; torch would refuse it only once it is used, with its own words ("Torch not
    compiled with CUDA enabled"). ``cuda`` is ``cuda:{rank}`` (a learner rank's GPU). Unlike
    :func:`check_device`, for the process that is about to use the device, not a config."""
    present = present_devices()
    if not DEVICE.fullmatch(value):
        raise ValueError(f"{name} {value!r} is no device: 'auto', 'cpu', 'cuda' or 'cuda:N' "
                         f"(available here: {', '.join(present)})")
    if (f"cuda:{rank}" if value == "cuda" else value) not in present:
        said = f"{value!r} (cuda:{rank}: LOCAL_RANK {rank})" if value == "cuda" and rank else repr(value)
        raise ValueError(f"{name} {said} is not available here (available: {', '.join(present)})")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/default"
    """Folder for everything a run writes: snapshots, replay store, logs, evaluations."""
    seed: int = 0
    """Seed of every random choice in the run (synthetic world, sampling, model init)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Threshold of the structured (JSON lines) logs every process writes to stderr."""
    feeder_nice: int = 0
    """CPU niceness (0-19) the stages that feed the learner add to their own: the streamer (and
    its decode workers), the labelers (and their threads) and the evaluator. The learner and
    replay keep theirs, so on a shared host the learner's Python thread, which launches its GPU
    work, is not queued behind labelling threads. 0 here (on a 2-core host the learner would take
    the labelers' CPU); 10 in ``configs/gpu.yaml`` (one H100 host: the learner at 0.80x of its
    rate alone beside two labelers, 0.73x at 0, one pair of pipeline runs; the contention
    benchmark of the twelfth pass found no reliable gain from niceness beside SIFT threads
    alone, 0.72-0.86x against 0.70-0.88x; docs/BENCHMARKS.md, issue 18)."""

    def __post_init__(self) -> None:
        if not self.dir.strip():  # "" would run in the working directory, among the user's files
            raise ValueError(f"dir must name a folder, got {self.dir!r}")
        if not 0 <= self.feeder_nice <= 19:
            raise ValueError(f"feeder_nice must be in 0..19, got {self.feeder_nice}")
        if self.seed < 0:  # NumPy's seed sequences take none below 0
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(kw_only=True, slots=True)
class CurveConfig:
    """CURVE keys of the ZeroMQ links (``network.curve``). Paths may be relative to the
    working directory; ``reliev3r keys --out DIR`` writes a matching set."""

    enabled: bool = False
    """Require CURVE on every ZeroMQ link (needed before binding beyond 127.0.0.1)."""
    server_secret_key: str = ""
    """Certificate file with the server key pair (``server.key_secret``), read by binding stages."""
    server_public_key: str = ""
    """Certificate file with the server public key (``server.key``), read by connecting stages."""
    client_secret_key: str = ""
    """Certificate file with this client's key pair (``client.key_secret``)."""
    client_public_key: str = ""
    """Certificate file with this client's public key (``client.key``)."""
    authorized_clients: str = ""
    """Folder of ``*.key`` client public keys a server accepts; any other key is refused."""

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        for name in ("server_secret_key", "server_public_key", "client_secret_key", "client_public_key",
                     "authorized_clients"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be set when curve is enabled")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CurveConfig":
        """The config that matches a folder written by :func:`reliev3r.security.generate_keys`."""
        folder = Path(folder)
        return cls(enabled=True, server_secret_key=str(folder / "server.key_secret"),
                   server_public_key=str(folder / "server.key"),
                   client_secret_key=str(folder / "client.key_secret"),
                   client_public_key=str(folder / "client.key"),
                   authorized_clients=str(folder / "authorized_clients"))


@dataclass(kw_only=True, slots=True)
class NetworkConfig:
    """ZeroMQ endpoints. Port 0 (the default) means "pick a free port": ``reliev3r up`` resolves
    it and records the result in ``<run.dir>/config.yaml`` and ``processes.json``, so several
    runs share a host. Stages started on their own need explicit ports (their peers must find
    them): ``deploy/`` sets 5701-5703."""

    host: str = "127.0.0.1"
    """Address every stage binds to. Bind wider only with CURVE keys configured."""
    work_port: int = 0
    """Streamer ROUTER: labelers ask for windows here and report them done."""
    replay_port: int = 0
    """Replay ROUTER: inserts from labelers, samples and stats for learners."""
    supervisor_port: int = 0
    """Supervisor PULL: heartbeats of every child process."""
    connect_host: str = ""
    """Host other stages connect to; empty means the same as ``host``."""
    curve: CurveConfig = field(default_factory=CurveConfig)
    """CURVE authentication of every ZeroMQ link (keys from ``reliev3r keys``)."""
    allow_insecure_remote: bool = False
    """Allow binding beyond loopback without CURVE (only on a network you fully trust)."""

    def __post_init__(self) -> None:
        for name in ("work_port", "replay_port", "supervisor_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"network.{name}: port {port} outside 0..65535")
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        if not loopback and not self.curve.enabled and not self.allow_insecure_remote:
            raise ConfigError(f"network.host: binding {self.host} beyond loopback needs network.curve.enabled=true "
                              "(keys from 'reliev3r keys'), or network.allow_insecure_remote=true")

    def bind(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"

    def connect(self, port: int) -> str:
        return f"tcp://{self.connect_host or self.host}:{port}"


# --------------------------------------------------------------------------- building

SIZE_IN_ONE = re.compile(r"\s*\d+\s*[x×X*]\s*\d+\s*")
"""An image size written as one value ("168x224", "224 x 168"), which could be height x width or
width x height: refused where an integer is expected (a size is two keys, ``height`` and
``width``, read as (H, W))."""


def build(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from plain data (dicts, lists, scalars), strictly."""
    return _convert(data, cls, key)


def _convert(value: Any, tp: Any, key: str) -> Any:
    where = key or "<root>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = [k for k in value if k not in fields]
        if unknown:
            bad = unknown[0]
            close = difflib.get_close_matches(str(bad), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{_join(key, bad)}: unknown key{hint}; "
                              f"known keys: {', '.join(sorted(fields))}")
        kwargs = {k: _convert(v, hints[k], _join(key, k)) for k, v in value.items()}
        for k, v in kwargs.items():  # a mapping field: the keys given update its default, one by one
            default = fields[k].default_factory
            if isinstance(v, dict) and default is not dataclasses.MISSING and isinstance(base := default(), dict):
                kwargs[k] = {**base, **v}
        try:
            return tp(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            # __post_init__ messages start with the field name: "views must be >= 2".
            raise ConfigError(_join(key, str(err))) from None
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, _join(key, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str) and SIZE_IN_ONE.fullmatch(value):  # "168x224": which order?
            section = key.rpartition(".")[0]
            keys = " and ".join(_join(section, side) for side in ("height", "width"))
            raise ConfigError(f"{where}: expected an integer, got {value!r}: an image size is not one value but "
                              f"two keys, {keys} (each in pixels)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _join(key: str, sub: Any) -> str:
    return f"{key}.{sub}" if key else str(sub)


def to_dict(cfg: Any) -> Any:
    """Plain data (for YAML, JSON snapshot meta and the supervisor's resolved config)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# --------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"learner.lr=3e-4"`` -> (["learner", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
    # YAML reads "1e-3" as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            pass
    return parts, value


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_data(paths: list[str | Path] = (), overrides: list[str] = ()) -> dict:
    data: dict = {}
    for path in paths:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = merge(data, loaded)
    for text in overrides:
        _set(data, *parse_override(text))
    return data


def _set(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


def with_overrides(cfg: Any, overrides: list[str] = ()) -> Any:
    """A copy of dataclass ``cfg`` with ``key.sub=value`` overrides applied (parsed and checked
    as the command line's are: ``with_overrides(LearnerConfig(), ["loss.kind=supervised"])``)."""
    data = to_dict(cfg)
    for text in overrides:
        _set(data, *parse_override(text))
    return build(type(cfg), data)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
