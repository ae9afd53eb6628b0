"""What deploy/ ships: the systemd unit passes `systemd-analyze verify` (where systemd is
installed), the container file copies every package the project is made of, and the
config examples load (tests/test_config.py). Nothing is built that cannot be here: the
machine has no registry to pull a base image from."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_systemd_unit_verifies(tmp_path):
    unit = (DEPLOY / "vdi-transfer.service").read_text()
    command = Path(sys.executable).parent / "vdi-transfer"  # as installed by `make`
    assert "ExecStart=/opt/vdi-transfer/.venv/bin/vdi-transfer serve" in unit
    local = tmp_path / "vdi-transfer.service"
    local.write_text(unit.replace("/opt/vdi-transfer/.venv/bin/vdi-transfer", str(command)))
    checked = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [
        line for line in (checked.stdout + checked.stderr).splitlines() if local.name in line
    ]
    assert checked.returncode == 0 and not complaints, checked.stdout + checked.stderr
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure"):
        assert hardening in unit
    assert re.search(r"^User=vdi-transfer$", unit, re.M) and "ExecReload=" in unit


def test_the_container_file_copies_every_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    containerfile = (DEPLOY / "Containerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", containerfile, re.M))
    assert set(packages) <= copied, f"not copied: {set(packages) - copied}"
    assert 'ENTRYPOINT ["vdi-transfer", "serve"]' in containerfile
    assert "vdi-transfer" in project["project"]["scripts"]
    compose = (DEPLOY / "pool" / "compose.yaml").read_text()
    assert "image: localhost/vdi-transfer:latest" in compose
    assert "-t vdi-transfer ." in containerfile
