"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, a free port.

``AGENT_RUNS_TEST_POSTGRES_URL`` names a server to use instead (its user must be allowed to
create databases). Otherwise the cluster is made with the server programs of the OS package
(``/usr/lib/postgresql/<version>/bin``, or wherever ``pg_config --bindir`` says), run as the
``postgres`` user when the tests run as root (initdb refuses root), listening on 127.0.0.1
only. Without either, the tests that need PostgreSQL fail, saying what to install.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

URL_VARIABLE = "AGENT_RUNS_TEST_POSTGRES_URL"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server to test against."""


def server_programs() -> Path:
    """Return the folder of initdb, pg_ctl and postgres; raise PostgresMissing if none."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not folders and (pg_config := shutil.which("pg_config")):
        folders = [subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout]
    for folder in reversed(folders):
        if (Path(folder.strip()) / "initdb").exists():
            return Path(folder.strip())
    raise PostgresMissing(
        "The PostgreSQL tests need a server: install it (apt-get install -y postgresql) or "
        f"set {URL_VARIABLE} to a server whose user may create databases."
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresCluster:
    """``with PostgresCluster() as cluster:`` a running server; ``cluster.new_database()``."""

    def __init__(self, admin_url: str | None = None) -> None:
        self.admin_url = admin_url or os.environ.get(URL_VARIABLE) or ""
        self.folder: Path | None = None
        self.port = 0
        self._names = itertools.count(1)
        self._programs: Path | None = None

    # Starting and stopping ----------------------------------------------------------------

    def __enter__(self) -> PostgresCluster:
        if not self.admin_url:
            self._programs = server_programs()
            self.folder = Path(tempfile.mkdtemp(prefix="agent-runs-pg-"))
            self._as_owner(["chown", "-R", self._owner(), str(self.folder)], as_root=True)
            self._initdb()
            self.port = free_port()
            self.start()
            self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.folder is not None:
            self.stop()
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _owner(self) -> str:
        return "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _as_owner(self, command: list[str], *, as_root: bool = False, **kwargs) -> None:
        if os.geteuid() == 0 and not as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")

    def _initdb(self) -> None:
        assert self._programs is not None and self.folder is not None
        self._as_owner(
            [
                str(self._programs / "initdb"),
                "-D",
                str(self.folder / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )

    def start(self) -> None:
        """Start the server (again, after :meth:`stop`) on the same port and data."""
        assert self._programs is not None and self.folder is not None
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.folder}",
                # A test cluster need not survive a power cut: commits need not wait for disk.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
            ]
        )
        self._as_owner(
            [
                str(self._programs / "pg_ctl"),
                "-D",
                str(self.folder / "data"),
                "-o",
                options,
                "-l",
                str(self.folder / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self) -> None:
        """Stop the server at once, cutting every connection (pg_ctl's fast mode)."""
        assert self._programs is not None and self.folder is not None
        self._as_owner(
            [
                str(self._programs / "pg_ctl"),
                "-D",
                str(self.folder / "data"),
                "-m",
                "fast",
                "-w",
                "stop",
            ]
        )

    @property
    def can_restart(self) -> bool:
        """Whether the tests own this server (and so may stop and start it)."""
        return self.folder is not None

    # Databases ----------------------------------------------------------------------------

    def new_database(self) -> str:
        """Create an empty database; return its URL."""
        import psycopg

        name = f"agent_runs_test_{os.getpid()}_{next(self._names)}_{int(time.time() * 1000)}"
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        parts = urllib.parse.urlsplit(self.admin_url)
        return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
