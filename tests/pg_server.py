"""A throwaway PostgreSQL server for tests, started from the machine's own binaries.

``PostgresServer`` runs ``initdb`` (UTF-8, locale ``C.UTF-8``) into a fresh temporary
directory and starts ``postgres`` with ``pg_ctl`` on a free port of 127.0.0.1, with its
socket in that directory. PostgreSQL refuses to run as root, so as root the cluster is
owned and run by an unprivileged user (``nobody`` unless ``$THREAD_STORE_PG_USER`` names
another). ``stop`` shuts it down (``pg_ctl stop -m immediate``) and removes the
directory; the context manager stops it also when the tests fail.

Durability settings are off (``fsync``, ``full_page_writes``): the tests check the
contract, not the disk. The fault tests that crash the server (``crash``, then
``start_again``) start their own with :data:`DURABLE` settings; the benchmarks start
theirs through this class with PostgreSQL's default settings (``benchmarks/pg_systems.py``
imports it: both live in the checkout only).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

#: Where Debian and most distributions put the server binaries when they are not on PATH.
_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
_FAST = ("-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=on",
         "-c", "max_connections=200")
#: A server that keeps what it acknowledged across a crash (PostgreSQL's defaults, spelled out).
DURABLE = ("-c", "fsync=on", "-c", "full_page_writes=on", "-c", "synchronous_commit=on",
           "-c", "max_connections=200")
DATABASE = "thread_store_test"
USER = "thread_store"


class PostgresUnavailable(RuntimeError):
    """The machine has no PostgreSQL server binaries, or the server would not start."""


def find_binary(name: str) -> str:
    """The path of a server binary (``initdb``, ``pg_ctl``), on PATH or in Debian's place."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _BIN_DIRS:
        if (directory / name).is_file():
            return str(directory / name)
    raise PostgresUnavailable(f"no {name} found on PATH or in /usr/lib/postgresql/*/bin; "
                              "install PostgreSQL (e.g. apt-get install postgresql-15)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; use it as a context manager."""

    def __init__(self, extra_settings: tuple[str, ...] = _FAST) -> None:
        self._initdb = find_binary("initdb")
        self._pg_ctl = find_binary("pg_ctl")
        self._settings = extra_settings
        self.port = _free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="thread-store-pg-"))
        self._run_as: Callable[[], None] | None = None
        if os.geteuid() == 0:
            account = pwd.getpwnam(os.environ.get("THREAD_STORE_PG_USER", "nobody"))
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self._run_as = _switch_user(account.pw_uid, account.pw_gid)
        self.directory.chmod(0o755)  # other users (the tests run as root) reach the socket
        self._started = False

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL of the test database, over TCP."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        """Create the cluster and its database, and start the server (waits until ready)."""
        self._run([self._initdb, "--no-sync", "-D", str(self.directory / "data"), "-U", USER,
                   "-E", "UTF8", "--locale=C.UTF-8", "-A", "trust"])
        self.start_again()
        self._run([find_binary("createdb"), "-h", str(self.directory), "-p", str(self.port),
                   "-U", USER, DATABASE])

    def start_again(self) -> None:
        """Start the server on its existing cluster (after :meth:`crash`), on the same port;
        waits until it accepts connections (crash recovery included)."""
        options = " ".join(["-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                            "-c", f"unix_socket_directories={self.directory}", *self._settings])
        self._run([self._pg_ctl, "start", "-w", "-t", "60", "-D", str(self.directory / "data"),
                   "-o", options, "-l", str(self.directory / "server.log")])
        self._started = True

    def crash(self) -> None:
        """Stop the server the way a crash does (``pg_ctl stop -m immediate``: every
        session is cut, nothing is checkpointed; the next start replays the WAL), keeping
        its cluster for :meth:`start_again`."""
        self._run([self._pg_ctl, "stop", "-D", str(self.directory / "data"), "-m", "immediate",
                   "-w", "-t", "60"])
        self._started = False

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        try:
            if self._started:
                self._run([self._pg_ctl, "stop", "-D", str(self.directory / "data"), "-m", "immediate",
                           "-w", "-t", "60"])
                self._started = False
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        """The server's log so far (for a failing test's report)."""
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, cwd=self.directory, preexec_fn=self._run_as, capture_output=True,
                              text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(command[:2])} failed ({done.returncode}): "
                                      f"{done.stderr.strip() or done.stdout.strip()}\n{self.log()}")


def _switch_user(uid: int, gid: int) -> Callable[[], None]:
    def switch() -> None:  # runs in the child between fork and exec
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return switch
