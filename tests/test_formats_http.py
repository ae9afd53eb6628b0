"""Streaming conversion end to end: images built by qemu-img are uploaded with curl and the
VDI compared with the raw reference; exports are checked by qemu-img (compare, check) and
their Content-Length and ranges against the full download (contract: Import, Export)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.rawclient import AUTH, api, create_vdi, curl_upload, export_to, sha256_file, task

MiB = 1 << 20
# Not a multiple of 64 KiB or 2 MiB; data crosses block and cluster boundaries.
SIZE = 40 * MiB + 3 * 512


@pytest.fixture
def srv(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A raw disk with data islands across block/cluster boundaries, half of it data."""
    path = tmp_path_factory.mktemp("ref") / "ref.raw"
    data = bytearray(SIZE)
    for start, length in (
        (0, 3 * MiB),
        (2 * MiB - 4096, 8192),
        (9 * MiB + 512, 5 * MiB),
        (20 * MiB, 12 * MiB),
        (SIZE - 3 * 512 - 100, 3 * 512 + 100),
    ):
        data[start : start + length] = os.urandom(length)
    path.write_bytes(data)
    return path


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def image_of(reference: Path, fmt: str, tmp: Path, *options: str) -> Path:
    out = tmp / f"image.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, *options, str(reference), str(out))
    return out


def vdi_file(srv, vdi: dict) -> Path:
    return srv.state_dir / "srs" / vdi["sr"] / f"{vdi['uuid']}.raw"


def upload(srv, path: Path, query: str):
    return curl_upload(f"{srv.url}/import_raw_vdi?{query}", "-T", str(path))


CASES = [
    ("vhd", "formats.vhd", "vpc", ("-o", "subformat=dynamic,force_size=on")),
    ("vhd", "formats.vhd", "vpc", ("-o", "subformat=fixed,force_size=on")),
    ("qcow2", "formats.qcow2", "qcow2", ()),
    ("qcow2", "formats.qcow2", "qcow2", ("-c", "-o", "cluster_size=4096")),
    ("qcow2", "formats.qcow2", "qcow2", ("-o", "compat=0.10,cluster_size=2M")),
]


@pytest.mark.parametrize("fmt, module, qfmt, options", CASES)
def test_upload_image_into_existing_vdi(srv, reference, tmp_path, fmt, module, qfmt, options):
    pytest.importorskip(module)
    image = image_of(reference, qfmt, tmp_path, *options)
    vdi = create_vdi(srv.url, SIZE + 4 * MiB)  # bigger than the image: the rest is kept
    tail = os.urandom(MiB)
    with open(vdi_file(srv, vdi), "r+b") as f:
        f.write(os.urandom(SIZE))  # old content the whole image must replace
        f.seek(SIZE + MiB)
        f.write(tail)
    status, body, err = upload(srv, image, f"vdi={vdi['uuid']}&format={fmt.upper()}")
    assert status == 200, (body, err)
    done = task(srv.url, body["task"])
    assert done["status"] == "success" and done["result"] == vdi["uuid"]
    with open(vdi_file(srv, vdi), "rb") as f:
        assert f.read(SIZE) == reference.read_bytes()
        f.seek(SIZE + MiB)
        assert f.read(MiB) == tail


@pytest.mark.parametrize("fmt, module, qfmt, options", CASES[:3])
def test_upload_image_creates_vdi_sized_by_header(
    srv, reference, tmp_path, fmt, module, qfmt, options
):
    pytest.importorskip(module)
    image = image_of(reference, qfmt, tmp_path, *options)
    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    status, body, err = upload(srv, image, f"sr={sr}&format={fmt}")
    assert status == 200, (body, err)
    _, vdi = api(f"{srv.url}/vdis/{body['vdi']}")
    assert vdi["virtual_size"] == SIZE
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(reference)
    # Zero blocks of the image were not written: the file is sparse.
    assert os.stat(vdi_file(srv, vdi)).st_blocks * 512 < SIZE


def test_image_larger_than_vdi_is_refused_before_writing(srv, reference, tmp_path):
    pytest.importorskip("formats.qcow2")
    image = image_of(reference, "qcow2", tmp_path)
    vdi = create_vdi(srv.url, 8 * MiB)
    status, body, _ = upload(srv, image, f"vdi={vdi['uuid']}&format=qcow2")
    assert status == 413 and body["error"] == "VDI_TOO_SMALL"
    assert os.stat(vdi_file(srv, vdi)).st_blocks == 0


def test_malformed_image_is_image_invalid_and_touches_nothing_else(srv, reference, tmp_path):
    pytest.importorskip("formats.qcow2")
    bystander = create_vdi(srv.url, MiB)
    src = tmp_path / "b"
    src.write_bytes(os.urandom(MiB))
    curl_upload(f"{srv.url}/import_raw_vdi?vdi={bystander['uuid']}", "-T", str(src))
    before = sha256_file(vdi_file(srv, bystander))
    image = image_of(reference, "qcow2", tmp_path)
    data = bytearray(image.read_bytes())
    data[0:4] = b"QFI\xfa"  # bad magic
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(data)
    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    vdis_before = {v["uuid"] for v in api(f"{srv.url}/vdis")[1]}
    status, body, _ = upload(srv, bad, f"sr={sr}&format=qcow2")
    assert status == 400 and body["error"] == "IMAGE_INVALID", body
    assert {v["uuid"] for v in api(f"{srv.url}/vdis")[1]} == vdis_before
    assert sha256_file(vdi_file(srv, bystander)) == before
    spills = list((srv.state_dir / "srs" / sr).glob(".spill-*"))
    assert spills == []


def test_truncated_image_fails_the_task(srv, reference, tmp_path):
    pytest.importorskip("formats.vhd")
    image = image_of(reference, "vpc", tmp_path, "-o", "subformat=dynamic,force_size=on")
    cut = tmp_path / "cut.vhd"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    vdi = create_vdi(srv.url, SIZE)
    status, body, _ = upload(srv, cut, f"vdi={vdi['uuid']}&format=vhd")
    assert status == 400 and body["error"] == "IMAGE_INVALID", body
    failed = [t for t in api(f"{srv.url}/tasks")[1] if t["vdi"] == vdi["uuid"]]
    assert [t["status"] for t in failed] == ["failure"]


# -- exports -------------------------------------------------------------------------------

EXPORTS = [("vhd", "formats.vhd", "vpc"), ("qcow2", "formats.qcow2", "qcow2")]


def exported(srv, vdi, fmt, dest: Path, *args: str) -> dict[str, str]:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-f",
            "-u",
            AUTH,
            "-D",
            "-",
            "-o",
            str(dest),
            *args,
            f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}&format={fmt}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    return {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}


@pytest.fixture
def loaded_vdi(srv, reference):
    vdi = create_vdi(srv.url, SIZE)
    status, _, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(reference))
    assert status == 200
    return vdi


@pytest.mark.parametrize("fmt, module, qfmt", EXPORTS)
def test_export_checked_by_qemu_img(srv, loaded_vdi, reference, tmp_path, fmt, module, qfmt):
    pytest.importorskip(module)
    out = tmp_path / f"out.{fmt}"
    headers = exported(srv, loaded_vdi, fmt, out)
    assert int(headers["content-length"]) == out.stat().st_size
    assert headers["content-disposition"].endswith(f'.{fmt}"')
    subprocess.run(
        ["qemu-img", "compare", "-f", qfmt, "-F", "raw", str(out), str(reference)],
        check=True,
        capture_output=True,
    )
    if fmt == "qcow2":
        subprocess.run(
            ["qemu-img", "check", "-f", "qcow2", str(out)], check=True, capture_output=True
        )
    info = subprocess.run(
        ["qemu-img", "info", "-f", qfmt, "--output=json", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f'"virtual-size": {SIZE}' in info.stdout
    # Deterministic: the same request gives the same bytes and ETag.
    again = tmp_path / f"again.{fmt}"
    assert exported(srv, loaded_vdi, fmt, again)["etag"] == headers["etag"]
    assert sha256_file(again) == sha256_file(out)
    # Any range of the converted stream, including resumed downloads.
    full = out.read_bytes()
    for first, last in (
        (0, 511),
        (1000, 70000),
        (len(full) - 5000, len(full) - 1),
        (len(full) // 2, len(full) // 2 + 3 * MiB),
    ):
        part = tmp_path / "part"
        h = exported(srv, loaded_vdi, fmt, part, "-r", f"{first}-{last}")
        assert h["content-range"] == f"bytes {first}-{last}/{len(full)}"
        assert part.read_bytes() == full[first : last + 1]
    partial = tmp_path / "resumed"
    partial.write_bytes(full[: len(full) // 3])
    subprocess.run(
        [
            "curl",
            "-sS",
            "-f",
            "-u",
            AUTH,
            "-C",
            "-",
            "-o",
            str(partial),
            f"{srv.url}/export_raw_vdi?vdi={loaded_vdi['uuid']}&format={fmt}",
        ],
        check=True,
        capture_output=True,
    )
    assert partial.read_bytes() == full


@pytest.mark.parametrize("fmt, module, qfmt", EXPORTS)
def test_export_then_import_round_trip(srv, loaded_vdi, reference, tmp_path, fmt, module, qfmt):
    pytest.importorskip(module)
    out = tmp_path / f"out.{fmt}"
    exported(srv, loaded_vdi, fmt, out)
    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    status, body, err = upload(srv, out, f"sr={sr}&format={fmt}")
    assert status == 200, (body, err)
    _, vdi = api(f"{srv.url}/vdis/{body['vdi']}")
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(reference)


def test_tar_round_trip(srv, loaded_vdi, reference, tmp_path):
    pytest.importorskip("formats.xapi_tar")
    out = tmp_path / "out.tar"
    headers = exported(srv, loaded_vdi, "tar", out)
    assert headers["content-type"] == "application/x-tar"
    assert int(headers["content-length"]) == out.stat().st_size
    import tarfile

    with tarfile.open(out) as archive:
        names = archive.getnames()
    assert any(n.endswith("/00000000") for n in names)
    assert any(n.endswith(".xxhash") for n in names)
    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    status, body, err = upload(srv, out, f"sr={sr}&format=tar&virtual_size={SIZE}")
    assert status == 200, (body, err)
    _, vdi = api(f"{srv.url}/vdis/{body['vdi']}")
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(reference)


def test_ova_with_a_qcow2_disk(srv, reference, tmp_path):
    pytest.importorskip("formats.ova")
    pytest.importorskip("formats.qcow2")
    import tarfile

    disk = image_of(reference, "qcow2", tmp_path)
    ovf = tmp_path / "vm.ovf"
    ovf.write_text("<?xml version='1.0'?><Envelope/>")
    ova = tmp_path / "vm.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(ovf, arcname="vm.ovf")
        archive.add(disk, arcname="vm-disk1.qcow2")
    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    status, body, err = upload(srv, ova, f"sr={sr}&format=ova")
    assert status == 200, (body, err)
    _, vdi = api(f"{srv.url}/vdis/{body['vdi']}")
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(reference)


def test_qcow2_with_l1_at_the_end_goes_through_the_spill_file(srv, tmp_path):
    """After `qemu-img resize`, the L1 table sits behind the data: every cluster before it
    is parked in the SR's spill file until the L1 says what it is."""
    pytest.importorskip("formats.qcow2")
    image = tmp_path / "grown.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "8M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", str(image)],
        check=True,
        capture_output=True,
    )
    qemu_img("resize", "-f", "qcow2", str(image), "600M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 500M 2M", str(image)],
        check=True,
        capture_output=True,
    )
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(expected))
    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    status, body, err = upload(srv, image, f"sr={sr}&format=qcow2")
    assert status == 200, (body, err)
    _, vdi = api(f"{srv.url}/vdis/{body['vdi']}")
    assert vdi["virtual_size"] == 600 * MiB
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(expected)
    assert list((srv.state_dir / "srs" / sr).glob(".spill-*")) == []


def test_images_type_mapping_picks_the_runtime_format(reference, tmp_path):
    """A server configured with qcow2:vhd stores a qcow2 upload as a VHD VDI, same content."""
    pytest.importorskip("formats.qcow2")
    pytest.importorskip("formats.vhd_image")
    from tests.conftest import ServerProcess

    srv = ServerProcess(tmp_path / "state", env={"VDIT_IMAGES_TYPE_MAPPING": "qcow2:vhd"}).start()
    try:
        image = image_of(reference, "qcow2", tmp_path)
        sr = api(f"{srv.url}/srs")[1][0]["uuid"]
        status, body, err = upload(srv, image, f"sr={sr}&format=qcow2")
        assert status == 200, (body, err)
        _, vdi = api(f"{srv.url}/vdis/{body['vdi']}")
        assert vdi["image_format"] == "vhd"
        out = tmp_path / "back.raw"
        export_to(srv.url, vdi["uuid"], out)
        assert sha256_file(out) == sha256_file(reference)
        stored = srv.state_dir / "srs" / sr / f"{vdi['uuid']}.vhd"
        subprocess.run(
            ["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(stored), str(reference)],
            check=True,
            capture_output=True,
        )
    finally:
        srv.stop()
