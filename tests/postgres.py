"""A real PostgreSQL server for the tests: Debian's `postgresql` binaries, a throwaway cluster listening on a Unix
socket in its own 0700 folder only (no TCP: trust authentication reaches no other user of the machine), stopped when
the tests end. As root it runs as the `postgres` user (initdb refuses root)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or where Debian puts them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    return Path(folders[-1]) if folders else None


class Server:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.user = "postgres" if os.geteuid() == 0 else None  # the OS user the server runs as
        self.folder = Path(tempfile.mkdtemp(prefix="quantgate-pg-"))  # 0700: the socket's only door
        if self.user:
            entry = pwd.getpwnam(self.user)  # KeyError where Debian's package did not make the user
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.data = self.folder / "data"

    def _run(self, *args: str) -> None:
        subprocess.run([str(self.bindir / args[0]), *args[1:]], check=True, user=self.user, cwd=self.folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> "Server":
        self._run("initdb", "-D", str(self.data), "-U", "quantgate", "--auth=trust", "-E", "UTF8")
        options = f"-k {self.folder} -c listen_addresses='' -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://quantgate@/{database}?host={self.folder}"

    def new_database(self) -> str:
        """A fresh, empty database on the server: its URL."""
        import psycopg

        name = f"history_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
