"""Probing a service before the work that needs it starts: a client that retries an address
where nothing listens (Ray's for minutes, MLflow's HTTP client for about four) would otherwise
fail only after the training it was meant to serve, or never."""

import socket

from safeexport.errors import ConfigError

PROBE_TIMEOUT_S = 5.0


def check_reachable(host: str, port: int, what: str, fix: str) -> None:
    """Open and close one TCP connection to ``host:port`` within PROBE_TIMEOUT_S, or raise
    ConfigError naming ``what`` and ``fix``."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:  # refused, unreachable, unknown host, timed out
        raise ConfigError(f"{what}: nothing answers at {host}:{port} "
                          f"({e.strerror or e}); {fix}") from e
