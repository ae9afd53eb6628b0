"""Fixtures: the app in-process (pytest-aiohttp) and the real server as a subprocess."""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import settings

from transfer.app import create_app
from transfer.config import Config

# Property tests: no per-example deadline (a loaded machine must not fail them on time),
# and in CI (CI=true) a fixed sequence of examples, so a landing never depends on the
# luck of a seed; local runs keep exploring new examples.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ADMIN_PASSWORD = "admin-password"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ADMIN = basic("admin", ADMIN_PASSWORD)


PG_SERVER = os.environ.get("VDIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def _pg(sql: str, database: str = "postgres") -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(f"{PG_SERVER}/{database}", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_database():
    """A PostgreSQL database for this test run (real server, trust auth), dropped after."""
    name = f"vdit_test_{os.getpid()}"
    try:
        _pg(f"CREATE DATABASE {name}")
    except Exception as exc:
        pytest.skip(f"no PostgreSQL at {PG_SERVER}: {exc}")
    yield name
    _pg(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request, tmp_path: Path) -> Config:
    """The in-process tests run once on each state-store backend."""
    url = ""
    if request.param == "postgresql":
        database = request.getfixturevalue("pg_database")
        schema = f"t_{os.urandom(6).hex()}"
        _pg(f"CREATE SCHEMA {schema}", database)
        request.addfinalizer(lambda: _pg(f"DROP SCHEMA {schema} CASCADE", database))
        url = f"{PG_SERVER}/{database}?search_path={schema}"
    return Config(
        state_dir=tmp_path / "state",
        admin_password=ADMIN_PASSWORD,
        name_label="test-host",
        port=8080,
        database_url=url,
    )


@pytest.fixture
async def client(aiohttp_client, config):
    return await aiohttp_client(create_app(config))


@pytest.fixture
async def users(client):
    """An operator and a reader next to the admin; returns their Basic headers."""
    for name, role in (("oper", "operator"), ("reed", "reader")):
        resp = await client.post(
            "/users",
            json={"username": name, "password": f"{name}-password", "role": role},
            headers=ADMIN,
        )
        assert resp.status == 201, await resp.text()
    return {"operator": basic("oper", "oper-password"), "reader": basic("reed", "reed-password")}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`vdi-transfer serve` as a user runs it, on a loopback port, with its own state dir."""

    def __init__(
        self,
        state_dir: Path,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        cafile: Path | None = None,
    ):
        """With `cafile` (the CA of the certificate `env` gives it), the server speaks HTTPS."""
        self.state_dir = state_dir
        self.host = host
        self.port = free_port(host)
        self.url = f"{'https' if cafile else 'http'}://{host}:{self.port}"
        self.tls = ssl.create_default_context(cafile=str(cafile)) if cafile else None
        self.log_path = state_dir.parent / f"server-{self.port}.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {**os.environ, "VDIT_ADMIN_PASSWORD": ADMIN_PASSWORD, **self.extra_env}
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "transfer",
                "serve",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--state-dir",
                str(self.state_dir),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(
                    self.url + "/health", timeout=1, context=self.tls
                ) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def logs(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def server(tmp_path: Path):
    srv = ServerProcess(tmp_path / "state").start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.stop()


def curl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Real curl; -s -S so errors show, -w so the status is the last line of stdout."""
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60
    )
    if check and result.returncode != 0:
        raise AssertionError(f"curl failed: {result.stderr}")
    return result


def curl_json(*args: str) -> tuple[int, object]:
    import json

    out = curl(*args).stdout
    body, _, status = out.rpartition("\n")
    return int(status), (json.loads(body) if body.strip() else None)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One real server for a whole test module (each test makes its own VDIs)."""
    srv = ServerProcess(tmp_path_factory.mktemp("srv") / "state").start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.stop()


def self_signed(where: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), named `name`, and its key."""
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
