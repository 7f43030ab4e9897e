"""Shared fixtures: a throwaway PostgreSQL server for the multi-machine tuning tests."""
import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def _postgres_bin() -> str | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl), or None."""
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(dict):
    """Connection keywords (host, port) of a running server, and its control: `stop()` and
    `start()` as a database restart or an outage would."""

    def __init__(self, control, **where):
        super().__init__(**where)
        self._control = control

    def stop(self):
        self._control("-m", "fast", "stop")

    def start(self):
        self._control("start")


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server in a temporary folder, on a Unix socket only, for this test session.
    PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    root = tempfile.mkdtemp(prefix="metalforge-pg-")
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sock)
    as_user = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)
    run(os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    control = lambda *what: run(os.path.join(bindir, "pg_ctl"), "-D", data, "-l", os.path.join(root, "server.log"),
                                "-w", "-o", f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off "
                                "-c max_connections=100", *what)
    control("start")
    try:
        yield _Server(control, host=sock, port=port)
    finally:
        subprocess.run([*as_user, os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database on the session's server for one test, as an SQLAlchemy URL."""
    import psycopg
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    with psycopg.connect(dbname="postgres", user="postgres", autocommit=True, **postgres_server) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@/{name}?host={postgres_server['host']}&port={postgres_server['port']}"


def _fetched(fetch, what: str):
    """A dependency fetched with pip once per machine (CI too): the tests that need it skip only
    where PyPI is unreachable and nothing is cached."""
    from metalforge.errors import MetalforgeError
    try:
        return fetch()
    except MetalforgeError as e:
        if "could not fetch" in str(e):
            pytest.skip(f"PyPI unreachable and {what} not cached: {e}")
        raise


@pytest.fixture(scope="session")
def mlx_kernel_headers():
    """MLX's Metal kernel headers of the installed MLX (the mlx-metal wheel)."""
    from metalforge.kernels import mlx_headers
    return _fetched(mlx_headers.kernels_dir, "MLX's headers")


@pytest.fixture(scope="session")
def llamacpp_sources():
    """llama.cpp's Metal sources (llama-cpp-python's sdist)."""
    from metalforge.kernels import llamacpp_library
    return _fetched(llamacpp_library.include_root, "llama.cpp's sources")

