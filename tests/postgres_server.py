"""A throw-away PostgreSQL server for tests: Debian's binaries, a cluster in a temporary directory,
listening on 127.0.0.1 at a free port (scripts/test.sh installs `postgresql` when it is missing).

PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres` user the Debian
package creates. `stop()` and `start()` again keep the same directory and port: the fault tests stop the
database under load and bring it back.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import needs
from tests.service_fixtures import free_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://filo@127.0.0.1:{self.port}/filo"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args]), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._ctl("-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed (scripts/test.sh installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="filo-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(bindir, root, free_port())
    subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "filo",
                              "-E", "UTF8", "--no-sync"]), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
    server.start()
    subprocess.run(_as_owner([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "filo",
                              "filo"]), check=True, timeout=60)
    return server


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A throw-away server for the span of a fixture; under CI a missing PostgreSQL fails instead of skipping."""
    needs(postgres_bin() is not None, "PostgreSQL binaries (Debian's postgresql)")
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own (tests that stop it need their own)."""
    with running_postgres() as server:
        yield server

