"""The CURVE settings of the ZeroMQ links (``network.curve``): plain data, importable without
pyzmq (GPU hosts may lack it), shared by :mod:`reliev3r.config` and :mod:`reliev3r.security`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
        """The config that matches a folder written by :func:`generate_keys`."""
        folder = Path(folder)
        return cls(enabled=True, server_secret_key=str(folder / "server.key_secret"),
                   server_public_key=str(folder / "server.key"),
                   client_secret_key=str(folder / "client.key_secret"),
                   client_public_key=str(folder / "client.key"),
                   authorized_clients=str(folder / "authorized_clients"))
