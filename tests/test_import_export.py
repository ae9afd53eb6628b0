"""Raw import and export with real curl and wget against the real server (contract: Import,
Export). Round trips are checked by sha256; sparseness by st_blocks of the VDI file."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.rawclient import (
    AUTH,
    END,
    api,
    create_vdi,
    curl_upload,
    frame,
    parse_frames,
    sha256_file,
    task,
)

MiB = 1 << 20


@pytest.fixture
def srv(shared_server):
    return shared_server


def vdi_file(srv, vdi: dict) -> Path:
    return srv.state_dir / "srs" / vdi["sr"] / f"{vdi['uuid']}.raw"


def random_file(tmp_path: Path, name: str, size: int, zero_ranges=()) -> Path:
    path = tmp_path / name
    data = bytearray(os.urandom(size))
    for start, length in zero_ranges:
        data[start : start + length] = bytes(length)
    path.write_bytes(data)
    return path


def download(url: str, dest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "-u", AUTH, "-D", str(dest) + ".headers", "-o", str(dest), *args, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def headers_of(dest: Path) -> tuple[int, dict[str, str]]:
    blocks = Path(str(dest) + ".headers").read_bytes().decode().strip().split("\r\n\r\n")
    lines = blocks[-1].split("\r\n")
    status = int(lines[0].split()[1])
    return status, {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}


def test_curl_upload_and_download_round_trip(srv, tmp_path):
    vdi = create_vdi(srv.url, 16 * MiB)
    src = random_file(tmp_path, "disk.raw", 16 * MiB)
    status, body, err = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
    assert status == 200, (body, err)
    assert body["vdi"] == vdi["uuid"] and body["bytes"] == 16 * MiB
    done = task(srv.url, body["task"])
    assert done["status"] == "success" and done["progress"] == 1.0
    assert done["result"] == vdi["uuid"] and done["bytes_transferred"] == 16 * MiB
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(src)

    out = tmp_path / "out.raw"
    result = download(f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}", out)
    assert result.returncode == 0, result.stderr
    status, headers = headers_of(out)
    assert status == 200
    assert headers["content-length"] == str(16 * MiB)
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == f'attachment; filename="{vdi["uuid"]}.raw"'
    assert headers["etag"].startswith('"') and headers["etag"].endswith('"')
    assert task(srv.url, headers["task-id"])["status"] == "success"
    assert sha256_file(out) == sha256_file(src)


def test_chunked_transfer_encoding_from_stdin(srv, tmp_path):
    """curl -T - sends Transfer-Encoding: chunked; only [0, N) of the VDI changes."""
    vdi = create_vdi(srv.url, 8 * MiB)
    before = random_file(tmp_path, "before", 8 * MiB)
    curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(before))
    src = random_file(tmp_path, "src", 5 * MiB + 512)
    with open(src, "rb") as stdin:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "-v",
                "-u",
                AUTH,
                "-T",
                "-",
                f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}",
            ],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert "Transfer-Encoding: chunked" in result.stderr
    assert '"bytes": 5243392' in result.stdout, result.stdout
    data = vdi_file(srv, vdi).read_bytes()
    assert data[: 5 * MiB + 512] == src.read_bytes()
    assert data[5 * MiB + 512 :] == before.read_bytes()[5 * MiB + 512 :]


def test_wget_put_body_file(srv, tmp_path):
    vdi = create_vdi(srv.url, 4 * MiB)
    src = random_file(tmp_path, "src", 4 * MiB)
    result = subprocess.run(
        [
            "wget",
            "-q",
            "-O",
            "-",
            "--method=PUT",
            f"--body-file={src}",
            "--user=admin",
            "--password=" + AUTH.split(":", 1)[1],
            "--auth-no-challenge",
            f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(src)


def test_prefix_path_and_cookie_parameters(srv, tmp_path):
    """curl -T file URL/ appends the file name; parameters may come as cookies."""
    vdi = create_vdi(srv.url, MiB)
    src = random_file(tmp_path, "disk.img", MiB)
    status, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi/", "-T", str(src), "-b", f"vdi={vdi['uuid']}"
    )
    assert status == 200, body
    assert sha256_file(vdi_file(srv, vdi)) == sha256_file(src)
    out = tmp_path / "o"
    download(f"{srv.url}/export_raw_vdi/whatever.raw", out, "-b", f"vdi={vdi['ref']}")
    assert sha256_file(out) == sha256_file(src)


def test_sparse_upload_writes_no_zero_blocks(srv, tmp_path):
    vdi = create_vdi(srv.url, 64 * MiB)
    # 64 MiB with two 1 MiB data islands: only those become blocks on disk.
    path = tmp_path / "sparse"
    data = bytearray(64 * MiB)
    data[3 * MiB : 4 * MiB] = os.urandom(MiB)
    data[40 * MiB + 100 : 41 * MiB + 100] = os.urandom(MiB)
    path.write_bytes(data)
    status, _, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(path))
    assert status == 200
    target = vdi_file(srv, vdi)
    assert target.read_bytes() == bytes(data)
    allocated = os.stat(target).st_blocks * 512
    assert 2 * MiB <= allocated <= 2 * MiB + 256 * 1024, allocated
    _, record = api(f"{srv.url}/vdis/{vdi['uuid']}")
    assert record["physical_utilisation"] == allocated

    # Zeros uploaded over data become holes again.
    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(64 * MiB))
    status, _, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(zeros))
    assert status == 200
    assert os.stat(target).st_blocks == 0
    assert target.read_bytes() == bytes(64 * MiB)


def test_extents(srv, tmp_path):
    vdi = create_vdi(srv.url, 32 * MiB)
    body = frame(4 * MiB, os.urandom(MiB)) + frame(20 * MiB, os.urandom(2 * MiB)) + END
    path = tmp_path / "frames"
    path.write_bytes(body)
    status, _, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&chunked=true",
        "--data-binary",
        f"@{path}",
        "-X",
        "PUT",
    )
    assert status == 200
    status, extents = api(f"{srv.url}/vdis/{vdi['uuid']}/extents")
    assert status == 200
    assert extents == [
        {"start": 0, "length": 4 * MiB, "zero": True},
        {"start": 4 * MiB, "length": MiB, "zero": False},
        {"start": 5 * MiB, "length": 15 * MiB, "zero": True},
        {"start": 20 * MiB, "length": 2 * MiB, "zero": False},
        {"start": 22 * MiB, "length": 10 * MiB, "zero": True},
    ]


# -- XAPI chunk framing ---------------------------------------------------------------------


def put_frames(srv, tmp_path, vdi, body: bytes, *extra: str):
    path = tmp_path / "frames.bin"
    path.write_bytes(body)
    return curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&chunked=true", "-T", str(path), *extra
    )


def test_chunk_framing_changes_only_the_frames(srv, tmp_path):
    vdi = create_vdi(srv.url, 16 * MiB)
    base = random_file(tmp_path, "base", 16 * MiB)
    curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(base))
    a, b = os.urandom(3 * MiB + 512), os.urandom(4096)
    # Out of order, one frame of zeros (which zeroes), one empty frame (a no-op).
    body = (
        frame(10 * MiB, a) + frame(512, b) + frame(2 * MiB, bytes(MiB)) + frame(7 * MiB, b"") + END
    )
    status, result, err = put_frames(srv, tmp_path, vdi, body)
    assert status == 200, (result, err)
    expected = bytearray(base.read_bytes())
    expected[10 * MiB : 10 * MiB + len(a)] = a
    expected[512 : 512 + len(b)] = b
    expected[2 * MiB : 3 * MiB] = bytes(MiB)
    assert vdi_file(srv, vdi).read_bytes() == bytes(expected)


def test_chunk_framing_with_chunked_encoding(srv, tmp_path):
    vdi = create_vdi(srv.url, 4 * MiB)
    data = os.urandom(MiB)
    path = tmp_path / "frames.bin"
    path.write_bytes(frame(MiB, data) + END)
    with open(path, "rb") as stdin:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "-u",
                AUTH,
                "-T",
                "-",
                f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&chunked",
            ],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert '"bytes"' in result.stdout, result.stdout + result.stderr
    assert vdi_file(srv, vdi).read_bytes()[MiB : 2 * MiB] == data


@pytest.mark.parametrize(
    "body, status, code, message",
    [
        (frame(4 * MiB - 512, bytes(1024)) + END, 413, "VDI_TOO_SMALL", "beyond"),
        (frame(0, b"x" * 4096)[:2000], 400, "BAD_REQUEST", "middle of a frame"),
        (frame(0, b"x" * 4096), 400, "BAD_REQUEST", "before the terminator"),
        (frame(0, b"x" * 512) + END + b"junk", 400, "BAD_REQUEST", "follow the terminat"),
    ],
)
def test_chunk_framing_errors(srv, tmp_path, body, status, code, message):
    vdi = create_vdi(srv.url, 4 * MiB)
    got, result, err = put_frames(srv, tmp_path, vdi, body)
    assert got == status, (result, err)
    assert result["error"] == code and message in result["message"]
    failed = [t for t in api(f"{srv.url}/tasks")[1] if t["vdi"] == vdi["uuid"]]
    assert [t["status"] for t in failed] == ["failure"]
    assert failed[0]["error_info"][0] == code
    # The VDI is free again.
    ok, _, _ = put_frames(srv, tmp_path, vdi, END)
    assert ok == 200


def test_chunked_export_carries_only_data(srv, tmp_path):
    vdi = create_vdi(srv.url, "1G")
    pieces = {0: os.urandom(5 * MiB), 700 * MiB: os.urandom(MiB + 4096)}
    body = b"".join(frame(o, d) for o, d in pieces.items()) + END
    status, _, _ = put_frames(srv, tmp_path, vdi, body)
    assert status == 200
    out = tmp_path / "export.chunked"
    download(f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}&chunked=true", out)
    code, headers = headers_of(out)
    assert code == 200 and int(headers["content-length"]) == out.stat().st_size
    stream = out.read_bytes()
    frames = parse_frames(stream)
    assert sum(len(d) for _, d in frames) == 6 * MiB + 4096
    assert all(len(d) <= 2 * MiB and o % 512 == 0 for o, d in frames)
    rebuilt = {}
    for offset, data in frames:
        rebuilt[offset] = data
    joined = b"".join(rebuilt[o] for o in sorted(rebuilt) if o < 700 * MiB)
    assert joined == pieces[0]
    tail = b"".join(rebuilt[o] for o in sorted(rebuilt) if o >= 700 * MiB)
    assert tail == pieces[700 * MiB]
    # Its ranges work like any other export's.
    part = tmp_path / "part"
    download(f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}&chunked=true", part, "-r", "5-100")
    assert part.read_bytes() == stream[5:101]


# -- ranges and resumed downloads ---------------------------------------------------------


def test_ranges(srv, tmp_path):
    vdi = create_vdi(srv.url, 4 * MiB)
    src = random_file(tmp_path, "src", 4 * MiB)
    curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
    data = src.read_bytes()
    url = f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}"
    for spec, expected, content_range in (
        ("100-199", data[100:200], f"bytes 100-199/{4 * MiB}"),
        (f"{4 * MiB - 10}-", data[-10:], f"bytes {4 * MiB - 10}-{4 * MiB - 1}/{4 * MiB}"),
        ("-5", data[-5:], f"bytes {4 * MiB - 5}-{4 * MiB - 1}/{4 * MiB}"),
        (f"0-{10 * MiB}", data, f"bytes 0-{4 * MiB - 1}/{4 * MiB}"),
    ):
        out = tmp_path / "part"
        download(url, out, "-H", f"Range: bytes={spec}")
        status, headers = headers_of(out)
        assert status == 206, spec
        assert headers["content-range"] == content_range
        assert out.read_bytes() == expected, spec
    out = tmp_path / "part"
    download(url, out, "-H", f"Range: bytes={4 * MiB}-")
    status, headers = headers_of(out)
    assert status == 416 and headers["content-range"] == f"bytes */{4 * MiB}"
    assert b"RANGE_NOT_SATISFIABLE" in out.read_bytes()


def test_if_range_and_etag_follow_the_content(srv, tmp_path):
    vdi = create_vdi(srv.url, MiB)
    url = f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}"
    out = tmp_path / "o"
    download(url, out, "-I")
    etag = headers_of(out)[1]["etag"]
    download(url, out, "-I")
    assert headers_of(out)[1]["etag"] == etag  # same content, same ETag
    download(url, out, "-H", "Range: bytes=0-9", "-H", f"If-Range: {etag}")
    assert headers_of(out)[0] == 206
    src = random_file(tmp_path, "src", 4096)
    curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
    download(url, out, "-H", "Range: bytes=0-9", "-H", f"If-Range: {etag}")
    status, headers = headers_of(out)
    assert status == 200 and headers["etag"] != etag  # changed: the whole new content
    assert out.read_bytes()[:4096] == src.read_bytes()


def test_head_gives_headers_and_makes_no_task(srv, tmp_path):
    vdi = create_vdi(srv.url, MiB)
    tasks_before = len(api(f"{srv.url}/tasks")[1])
    out = tmp_path / "h"
    download(f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}", out, "-I")
    status, headers = headers_of(out)
    assert status == 200 and headers["content-length"] == str(MiB)
    assert "task-id" not in headers
    assert out.read_bytes().endswith(b"\r\n\r\n")  # headers only, no body
    assert len(api(f"{srv.url}/tasks")[1]) == tasks_before


def test_resumed_downloads_with_curl_and_wget(srv, tmp_path):
    vdi = create_vdi(srv.url, 8 * MiB)
    src = random_file(tmp_path, "src", 8 * MiB)
    curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
    url = f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}"
    partial = tmp_path / "curl.raw"
    partial.write_bytes(src.read_bytes()[: 3 * MiB + 17])
    result = subprocess.run(
        ["curl", "-sS", "-u", AUTH, "-C", "-", "-o", str(partial), url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sha256_file(partial) == sha256_file(src)

    wpartial = tmp_path / "wget.raw"
    wpartial.write_bytes(src.read_bytes()[:MiB])
    result = subprocess.run(
        [
            "wget",
            "-q",
            "-c",
            "-O",
            str(wpartial),
            "--user=admin",
            "--password=" + AUTH.split(":", 1)[1],
            "--auth-no-challenge",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sha256_file(wpartial) == sha256_file(src)


# -- creation with sr=, probes, and rejected requests --------------------------------------


def test_import_into_new_vdi_with_sr(srv, tmp_path):
    _, srs = api(f"{srv.url}/srs")
    sr = srs[0]["uuid"]
    src = random_file(tmp_path, "src", 3 * MiB + 100)
    status, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?sr={sr}&name_label=fromcurl", "-T", str(src)
    )
    assert status == 200, body
    _, vdi = api(f"{srv.url}/vdis/{body['vdi']}")
    assert vdi["virtual_size"] == 3 * MiB + 512 and vdi["name_label"] == "fromcurl"
    assert vdi_file(srv, vdi).read_bytes()[: 3 * MiB + 100] == src.read_bytes()

    with open(src, "rb") as stdin:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "-u",
                AUTH,
                "-T",
                "-",
                f"{srv.url}/import_raw_vdi?sr={sr}&virtual_size=8M",
            ],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert '"vdi"' in result.stdout, result.stdout


def test_failed_import_into_new_vdi_leaves_no_vdi(srv, tmp_path):
    _, srs = api(f"{srv.url}/srs")
    sr = srs[0]["uuid"]
    before = {v["uuid"] for v in api(f"{srv.url}/vdis")[1]}
    path = tmp_path / "bad"
    path.write_bytes(frame(0, b"x" * 512))  # no terminator
    status, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?sr={sr}&chunked=true&virtual_size=1M", "-T", str(path)
    )
    assert status == 400, body
    assert {v["uuid"] for v in api(f"{srv.url}/vdis")[1]} == before
    files = {p.name for p in (srv.state_dir / "srs" / sr).iterdir() if p.name != ".vdi-transfer-sr"}
    assert files == {f"{u}.raw" for u in before if api(f"{srv.url}/vdis/{u}")[1]["sr"] == sr}


def test_frames_over_frames_in_a_new_vdi(srv, tmp_path):
    """Frames may overlap: a later frame of zeros over an earlier frame's data leaves zeros,
    in a VDI the import creates too (where zeros need not be written otherwise)."""
    _, srs = api(f"{srv.url}/srs")
    sr = srs[0]["uuid"]
    data = os.urandom(MiB)
    body = frame(0, data) + frame(0, bytes(256 << 10)) + frame(768 << 10, bytes(1000)) + END
    path = tmp_path / "frames"
    path.write_bytes(body)
    status, result, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?sr={sr}&chunked=true&virtual_size=1M", "-T", str(path)
    )
    assert status == 200, result
    expected = bytes(256 << 10) + data[256 << 10 : 768 << 10] + bytes(1000)
    expected += data[(768 << 10) + 1000 :]
    assert vdi_file(srv, api(f"{srv.url}/vdis/{result['vdi']}")[1]).read_bytes() == expected


def test_empty_put_is_a_no_op(srv, tmp_path):
    vdi = create_vdi(srv.url, MiB)
    tasks_before = len(api(f"{srv.url}/tasks")[1])
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    status, body, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(empty))
    assert status == 200 and body["task"] is None and body["bytes"] == 0
    assert len(api(f"{srv.url}/tasks")[1]) == tasks_before
    _, srs = api(f"{srv.url}/srs")
    vdis_before = len(api(f"{srv.url}/vdis")[1])
    status, _, _ = curl_upload(f"{srv.url}/import_raw_vdi?sr={srs[0]['uuid']}", "-T", str(empty))
    assert status == 200 and len(api(f"{srv.url}/vdis")[1]) == vdis_before


@pytest.mark.parametrize(
    "query, status, code",
    [
        ("vdi=no-such-vdi", 404, "VDI_NOT_FOUND"),
        ("sr=no-such-sr", 404, "SR_NOT_FOUND"),
        ("", 400, "BAD_REQUEST"),
        ("vdi={vdi}&format=vmdk", 415, "FORMAT_UNSUPPORTED"),
        ("vdi={vdi}&format=VHD&chunked=true", 400, "BAD_REQUEST"),
        ("vdi={vdi}&sr={sr}", 400, "BAD_REQUEST"),
    ],
)
def test_import_rejections(srv, tmp_path, query, status, code):
    vdi = create_vdi(srv.url, MiB)
    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    src = random_file(tmp_path, "src", 4096)
    got, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?" + query.format(vdi=vdi["uuid"], sr=sr), "-T", str(src)
    )
    assert (got, body["error"]) == (status, code), body


def test_too_large_upload_is_rejected_before_anything_is_written(srv, tmp_path):
    vdi = create_vdi(srv.url, MiB)
    src = random_file(tmp_path, "src", MiB + 512)
    status, body, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
    assert status == 413 and body["error"] == "VDI_TOO_SMALL"
    assert os.stat(vdi_file(srv, vdi)).st_blocks == 0


def test_export_rejections(srv, tmp_path):
    vdi = create_vdi(srv.url, MiB)
    for query, status, code in (
        ("vdi=nope", 404, "VDI_NOT_FOUND"),
        ("", 400, "BAD_REQUEST"),
        (f"vdi={vdi['uuid']}&format=vmdk", 415, "FORMAT_UNSUPPORTED"),
        (f"vdi={vdi['uuid']}&base=nope", 404, "VDI_NOT_FOUND"),
    ):
        out = tmp_path / "o"
        download(f"{srv.url}/export_raw_vdi?{query}", out)
        assert headers_of(out)[0] == status, query
        assert code.encode() in out.read_bytes()


def test_upload_sha_matches_after_many_small_frames(srv, tmp_path):
    """Thousands of 512-byte frames: the writer's batching must keep order and content."""
    vdi = create_vdi(srv.url, 4 * MiB)
    data = os.urandom(2 * MiB)
    body = b"".join(frame(o, data[o : o + 512]) for o in range(0, len(data), 512)) + END
    status, _, _ = put_frames(srv, tmp_path, vdi, body)
    assert status == 200
    got = vdi_file(srv, vdi).read_bytes()
    assert hashlib.sha256(got[: 2 * MiB]).digest() == hashlib.sha256(data).digest()


def test_delete_or_write_right_after_a_download_is_not_refused(srv, tmp_path):
    """The last byte reaches the client before the export has closed its files: a delete
    or an upload that follows at once waits for it rather than getting VDI_IN_USE."""
    src = random_file(tmp_path, "src", MiB)
    for _ in range(10):
        vdi = create_vdi(srv.url, MiB)
        assert curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))[0] == 200
        out = tmp_path / "o"
        download(f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}", out)
        status, body, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
        assert status == 200, body
        download(f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}", out)
        assert api(f"{srv.url}/vdis/{vdi['uuid']}", "DELETE")[0] == 204
