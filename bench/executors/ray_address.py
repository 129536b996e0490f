"""The Ray address a run joins (``ray_address``, ``--address``), checked in seconds before
``ray.init``: joining an address where nothing answers, or something that is not Ray, makes Ray
retry for many minutes ("Failed to connect to GCS"). Ray's own waits are bounded too
(:func:`bounded_join_waits`), for an address that answers gRPC but is not a Ray head."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from bench.errors import ConfigError

#: Ray's default ports: the head's GCS (``ray start --head``) and the Ray client server
GCS_PORT, CLIENT_PORT = 6379, 10001

#: Ray's waits when joining a cluster (defaults: 20 attempts of up to ~40 s each), read from
#: the environment: the connect timeout when Ray is imported, the attempts at ``ray.init``.
#: A value the user set wins.
JOIN_WAITS = {"RAY_py_gcs_connect_timeout_s": "10", "RAY_gcs_server_port_wait_time_s": "2"}

HINT = "start the head with `ray start --head` or drop --address (ray_address) to run a local instance"  # fmt: skip


def is_remote(address: str | None) -> bool:
    """Whether ``address`` names a cluster to join ("auto", "local" and None keep Ray's
    meaning: the cluster `ray start` recorded here, or a new local instance)."""
    return address not in (None, "", "auto", "local")


def split_address(address: str) -> tuple[str, int, bool]:
    """(host, port, whether a ``ray://`` client address) of a Ray address; a missing port is
    Ray's default."""
    client = address.startswith("ray://")
    parts = urlsplit("//" + address.removeprefix("ray://"))
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.path not in ("", "/"):
        raise ConfigError(
            f"ray_address {address!r} is not an address: expected HOST:PORT, ray://HOST:PORT "
            "or auto"
        )
    return parts.hostname, port or (CLIENT_PORT if client else GCS_PORT), client


def probe_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """Fails in seconds, with a message, when nothing answers at a Ray address to join, or
    what answers is no gRPC server (a Ray head and a Ray client server both are)."""
    if not is_remote(address):
        return
    host, port, client = split_address(address)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as err:
        raise ConfigError(f"Ray: unknown host {host!r} in ray_address {address!r} ({err.strerror})") from None  # fmt: skip
    except OSError as err:
        reason = "connection refused" if isinstance(err, ConnectionRefusedError) else (
            f"no answer in {timeout:g} s" if isinstance(err, TimeoutError) else str(err))  # fmt: skip
        raise ConfigError(f"Ray: nothing answers at {where} ({reason}); {HINT}") from None
    if not speaks_grpc(where, timeout):
        what = "a Ray client server (ray://, port 10001 by default)" if client else (
            "a Ray head (its GCS port: `ray start --head --port`, 6379 by default)")  # fmt: skip
        raise ConfigError(
            f"Ray: {where} answers but is not {what}: no gRPC handshake in {timeout:g} s; "
            "check the address and port"
        )


def speaks_grpc(target: str, timeout: float) -> bool:
    """Whether a gRPC (HTTP/2) server answers at ``target``. Clusters with TLS
    (``RAY_USE_TLS``) are not checked: the plain handshake would fail on them."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    import grpc  # Ray's own dependency

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


@contextmanager
def bounded_join_waits(address: str | None) -> Iterator[None]:
    """Sets :data:`JOIN_WAITS` (those the user has not set) while Ray is imported and joins a
    cluster at ``address``; a local instance keeps Ray's defaults."""
    added = {} if not is_remote(address) else {
        k: v for k, v in JOIN_WAITS.items() if k not in os.environ}  # fmt: skip
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
