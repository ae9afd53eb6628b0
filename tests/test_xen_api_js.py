"""Xen Orchestra's own XenAPI connector (`xen-api` from npm) against the real server:
connect (JSON-RPC, its event loop with event.inject and event.from), records, putResource
of a raw disk and getResource of its export under tasks, a VHD delta between two snapshots
read with `vhd-lib`'s parseVhdStream, and a refused login. The client is
tests/js/xen_api_client.mjs; the packages are pinned in tests/js/package-lock.json."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD

JS = Path(__file__).parent / "js"
CACHE = JS.parent.parent / ".npm-cache"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """The pinned packages, installed once (`.ci/run` does it first in CI)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Xen Orchestra client tests")
    installed = JS / "node_modules" / ".package-lock.json"
    lock = JS / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--cache", str(CACHE)],
            cwd=JS,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return JS / "node_modules"


def test_xen_orchestra_connector(node_modules, shared_server):
    result = subprocess.run(
        ["node", str(JS / "xen_api_client.mjs"), shared_server.url, ADMIN_PASSWORD],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["connected"] == "connected"
    assert found["record"] == {
        "type": "VDI",
        "ref": True,
        "virtual_size": 8 << 20,
        "SR": True,
        "image_format": "vhd",
    }
    assert found["byUuid"] is True
    assert found["putResultIsVdi"] is True  # the task's <value>OpaqueRef:...</value>
    assert found["exportSame"] is True and found["exportTask"] == ""
    # The delta: a differencing VHD whose parent is the older snapshot, holding exactly the
    # two blocks written between the snapshots, with exactly their 8 + 2048 sectors marked.
    assert found["diskType"] == 4
    assert found["parentUuid"] == found["baseUuid"]
    assert found["blockSize"] == 2 << 20
    assert found["deltaBlocks"] == [1, 3]
    assert found["deltaSectors"] == 8 + 2048
    assert found["deltaMatches"] is True
    assert found["badLogin"] == "SESSION_AUTHENTICATION_FAILED"
