"""The client commands of `vdi-transfer`, against a server at --url (env VDIT_URL): login,
logout, upload, download, and the remote records (vdi, sr, task)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from typing import Any

from transfer.client import credentials
from transfer.client.download import Download
from transfer.client.http import Api, ClientError
from transfer.client.progress import Progress
from transfer.client.upload import Upload, choose_format, open_source

RETRY_FOR = 300.0  # seconds an upload or download keeps trying after a break
WATCH_INTERVAL = 1.0
REMOTE_VDI_ACTIONS = ("list", "show", "create", "snapshot", "clone", "delete")


def client_options(parser: argparse.ArgumentParser) -> None:
    """Where the server is and who is asking."""
    parser.add_argument("--url", default=None, help="the server, e.g. https://vdit:8080 (VDIT_URL)")
    parser.add_argument("--user", help="user name (a password is asked, or VDIT_PASSWORD)")
    parser.add_argument("--cacert", help="CA certificate to verify the server's (VDIT_CACERT)")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")


def _transfer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections at once (the server's OPTIONS caps it; default 1)",
    )
    parser.add_argument(
        "--retry-for",
        type=float,
        default=RETRY_FOR,
        help=f"seconds to keep trying after a break (default {RETRY_FOR:g})",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """login, logout, upload, download, task (vdi and sr gain remote actions elsewhere)."""
    login = sub.add_parser("login", help="log in and save the session for --url")
    client_options(login)
    logout = sub.add_parser("logout", help="revoke the saved session of --url")
    client_options(logout)

    upload = sub.add_parser("upload", help="upload a disk image into a VDI (resumable)")
    upload.add_argument("file", metavar="FILE", help="the image, or - for standard input")
    where = upload.add_mutually_exclusive_group(required=True)
    where.add_argument("--vdi", dest="to_vdi", help="the VDI to overwrite")
    where.add_argument("--sr", dest="to_sr", help="the SR of a new VDI")
    upload.add_argument("--name-label", dest="new_name", help="the new VDI's name")
    upload.add_argument(
        "--format",
        dest="upload_format",
        default="auto",
        choices=["auto", "raw", "vhd", "qcow2", "tar", "ova"],
        help="what FILE is (default: found from its content)",
    )
    upload.add_argument("--size", dest="new_size", help="size of a new VDI from a raw pipe")
    client_options(upload)
    _transfer_options(upload)

    download = sub.add_parser("download", help="download a VDI (resumable, sparse)")
    download.add_argument("vdi_id", metavar="ID", help="the VDI (uuid or OpaqueRef)")
    download.add_argument("-o", "--output", required=True, help="the file, or - for stdout")
    download.add_argument(
        "--format", dest="download_format", default="raw", choices=["raw", "vhd", "qcow2", "tar"]
    )
    download.add_argument("--base", help="an older version: only what changed since")
    client_options(download)
    _transfer_options(download)

    task = sub.add_parser("task", help="tasks on the server")
    task_sub = task.add_subparsers(dest="action", required=True)
    for action, help_text in (
        ("list", "list tasks"),
        ("show", "show a task"),
        ("watch", "follow a task until it ends"),
        ("cancel", "cancel a task (and its transfer)"),
    ):
        parser = task_sub.add_parser(action, help=help_text)
        if action != "list":
            parser.add_argument("task_id", metavar="ID")
        client_options(parser)


def add_vdi_actions(vdi_sub: argparse._SubParsersAction) -> None:
    """vdi list|show|create|snapshot|clone|delete, against --url."""
    for action, help_text in (
        ("list", "list VDIs"),
        ("show", "show a VDI"),
        ("create", "create an empty VDI"),
        ("snapshot", "snapshot a VDI"),
        ("clone", "clone a VDI"),
        ("delete", "delete a VDI"),
    ):
        parser = vdi_sub.add_parser(action, help=f"{help_text} (on the server at --url)")
        if action in ("show", "snapshot", "clone", "delete"):
            parser.add_argument("vdi_id", metavar="ID")
        if action == "list":
            parser.add_argument("--sr", dest="in_sr", help="only this SR's")
        if action == "create":
            parser.add_argument("--size", dest="new_size", required=True, help="e.g. 10G")
            parser.add_argument("--sr", dest="in_sr", help="default: the server's local SR")
            parser.add_argument(
                "--image-format", dest="new_format", choices=["raw", "vhd", "qcow2"]
            )
        if action in ("create", "snapshot", "clone"):
            parser.add_argument("--name-label", dest="new_name")
        client_options(parser)


def is_remote(args: argparse.Namespace) -> bool:
    """Client commands, and vdi/sr actions given a server (--url or VDIT_URL)."""
    if args.command in ("login", "logout", "upload", "download", "task"):
        return True
    if args.command == "vdi":
        return args.action in REMOTE_VDI_ACTIONS
    if args.command == "sr" and args.action == "list":
        return bool(getattr(args, "url", None) or os.environ.get("VDIT_URL"))
    return False


def _url(args: argparse.Namespace) -> str:
    url = args.url or os.environ.get("VDIT_URL")
    if not url:
        raise ClientError("NO_URL", "give --url (or set VDIT_URL): the server to talk to")
    return url.rstrip("/")


def _api(args: argparse.Namespace, authorization: str | None = None) -> Api:
    url = _url(args)
    if authorization is None:
        authorization = credentials.authorization(url, args.user)
    cafile = args.cacert or os.environ.get("VDIT_CACERT")
    return Api(url, authorization, cafile=cafile, insecure=args.insecure)


def run(args: argparse.Namespace) -> int:
    """Run a client command; its exit status (1: refused, 130: interrupted)."""
    try:
        return _COMMANDS[args.command](args)
    except ClientError as exc:
        print(f"vdi-transfer: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


def _login(args: argparse.Namespace) -> int:
    user = args.user or os.environ.get("VDIT_USER")
    if not user:
        if not sys.stdin.isatty():
            raise ClientError("NO_CREDENTIALS", "give --user (or set VDIT_USER)")
        user = input("User: ").strip()
    api = _api(args, credentials.basic(user, credentials.password_for(user)))
    session = api.call("POST", "/session", ok=(200,))
    path = credentials.save_session(api.url, session["session_id"])
    if args.json:
        print(json.dumps({"username": session["username"], "expires_at": session["expires_at"]}))
    else:
        print(f"logged in to {api.url} as {session['username']} until {session['expires_at']}"
              f" (session saved in {path})", file=sys.stderr)  # fmt: skip
    return 0


def _logout(args: argparse.Namespace) -> int:
    url = _url(args)
    session = credentials.saved_session(url)
    if session is None:
        print(f"no saved session for {url}", file=sys.stderr)
        return 0
    api = _api(args, f"Bearer {session}")
    try:
        api.call("DELETE", "/session", ok=(204,))
    except ClientError as exc:
        if exc.code != "SESSION_INVALID":  # expired or revoked already: forget it anyway
            raise
    credentials.forget_session(url)
    print(f"logged out of {url}", file=sys.stderr)
    return 0


def _upload(args: argparse.Namespace) -> int:
    api = _api(args)
    source = open_source(args.file)
    fmt = choose_format(source, args.upload_format)
    if args.to_vdi:
        target = {"vdi": args.to_vdi}
    else:
        target = {"sr": args.to_sr}
        if args.new_name:
            target["name_label"] = args.new_name
        size = args.new_size or (source.size if fmt == "raw" else None)
        if size is not None:
            target["virtual_size"] = str(size)
    connections = _connections(api, "/import_raw_vdi", "max_writers", args.connections)
    label = f"upload {os.path.basename(args.file) if args.file != '-' else 'stdin'}"
    progress = Progress(label, source.size, quiet=args.quiet)
    upload = Upload(api, source, fmt, target, progress, args.retry_for, connections)
    if connections > 1 and not upload.parted:
        print("vdi-transfer: only a raw file goes over several connections: this upload "
              "uses one", file=sys.stderr)  # fmt: skip
    try:
        result = upload.run()
    except KeyboardInterrupt:
        progress.close()
        upload.cancel()
        print(f"vdi-transfer: interrupted: task {upload.task} cancelled", file=sys.stderr)
        return 130
    finally:
        os.close(source.fd)
    _print_result(args, result.to_json(), f"uploaded {_size(result.bytes_sent)} to VDI "
                  f"{result.vdi} in {result.seconds:.1f} s (task {result.task})")  # fmt: skip
    return 0


def _download(args: argparse.Namespace) -> int:
    api = _api(args)
    progress = Progress(f"download {args.vdi_id[:8]}", None, quiet=args.quiet)
    connections = _connections(api, "/export_raw_vdi", "max_readers", args.connections)
    download = Download(api, args.vdi_id, args.output, args.download_format, args.base,
                        progress, args.retry_for, connections)  # fmt: skip
    try:
        result = download.run()
    except KeyboardInterrupt:
        progress.close()
        print("vdi-transfer: interrupted", file=sys.stderr)
        return 130
    _print_result(args, result.to_json(), f"downloaded {_size(result.bytes_received)} of VDI "
                  f"{result.vdi} in {result.seconds:.1f} s")  # fmt: skip
    return 0


def _connections(api: Api, path: str, key: str, asked: int) -> int:
    """As many connections as asked, and as the server's OPTIONS allow."""
    if asked <= 1:
        return 1
    allowed = api.call("OPTIONS", path, ok=(200,)).get(key, 1)
    if allowed < asked:
        print(f"vdi-transfer: the server takes {allowed} connection(s) at once here, "
              f"not {asked}", file=sys.stderr)  # fmt: skip
    return max(1, min(asked, allowed))


def _print_result(args: argparse.Namespace, data: dict, text: str) -> None:
    if args.json:
        print(json.dumps(data))
    elif not args.quiet:
        print(text, file=sys.stderr)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


VDI_COLUMNS = ("uuid", "name_label", "virtual_size", "image_format", "read_only", "parent")
SR_COLUMNS = ("uuid", "name_label", "type", "shared", "default_image_format", "host")
TASK_COLUMNS = ("uuid", "name_label", "status", "progress", "bytes_transferred", "vdi")


def _show(args: argparse.Namespace, data: Any, columns: tuple[str, ...]) -> None:
    """JSON with --json; a table on a terminal; tab-separated lines otherwise."""
    if args.json:
        print(json.dumps(data, indent=1 if sys.stdout.isatty() else None))
        return
    rows = data if isinstance(data, list) else [data]
    if not isinstance(data, list):  # one record: every field, one per line
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {_cell(value)}")
        return
    table = [list(columns)] + [[_cell(row.get(c)) for c in columns] for row in rows]
    if sys.stdout.isatty():
        widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
        for r in table:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    else:
        for r in table:
            print("\t".join(r))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _vdi(args: argparse.Namespace) -> int:
    api = _api(args)
    quoted = urllib.parse.quote(getattr(args, "vdi_id", "") or "")
    if args.action == "list":
        query = f"?sr={urllib.parse.quote(args.in_sr)}" if args.in_sr else ""
        _show(args, api.call("GET", f"/vdis{query}"), VDI_COLUMNS)
    elif args.action == "show":
        _show(args, api.call("GET", f"/vdis/{quoted}"), VDI_COLUMNS)
    elif args.action == "create":
        body: dict[str, Any] = {"virtual_size": args.new_size}
        for key, value in (("sr", args.in_sr), ("name_label", args.new_name),
                           ("image_format", args.new_format)):  # fmt: skip
            if value:
                body[key] = value
        _show(args, api.call("POST", "/vdis", body), VDI_COLUMNS)
    elif args.action in ("snapshot", "clone"):
        body = {"name_label": args.new_name} if args.new_name else {}
        _show(args, api.call("POST", f"/vdis/{quoted}/{args.action}", body), VDI_COLUMNS)
    elif args.action == "delete":
        api.call("DELETE", f"/vdis/{quoted}", ok=(204,))
        if not args.json:
            print(f"VDI {args.vdi_id} deleted", file=sys.stderr)
    return 0


def _sr(args: argparse.Namespace) -> int:
    _show(args, _api(args).call("GET", "/srs"), SR_COLUMNS)
    return 0


def _task(args: argparse.Namespace) -> int:
    api = _api(args)
    quoted = urllib.parse.quote(getattr(args, "task_id", "") or "")
    if args.action == "list":
        _show(args, api.call("GET", "/tasks"), TASK_COLUMNS)
    elif args.action == "show":
        _show(args, api.call("GET", f"/tasks/{quoted}"), TASK_COLUMNS)
    elif args.action == "cancel":
        _show(args, api.call("POST", f"/tasks/{quoted}/cancel", ok=(200,)), TASK_COLUMNS)
    elif args.action == "watch":
        return _watch(args, api, quoted)
    return 0


def _watch(args: argparse.Namespace, api: Api, quoted: str) -> int:
    """Follow a task: progress until it ends; exit 0 on success, 1 otherwise."""
    task = api.call("GET", f"/tasks/{quoted}")
    progress = Progress(f"task {task['uuid'][:8]} {task['name_label']}"[:60], 1000,
                        quiet=args.json)  # fmt: skip
    try:
        while task["status"] in ("pending", "cancelling"):
            progress.set(int(task["progress"] * 1000))
            time.sleep(WATCH_INTERVAL)
            task = api.call("GET", f"/tasks/{quoted}")
    except KeyboardInterrupt:
        return 130
    progress.set(int(task["progress"] * 1000))
    progress.close()
    if args.json:
        print(json.dumps(task))
    else:
        error = f": {' '.join(task['error_info'])}" if task["error_info"] else ""
        print(f"task {task['uuid']} {task['status']}{error}", file=sys.stderr)
    return 0 if task["status"] == "success" else 1


_COMMANDS = {
    "login": _login,
    "logout": _logout,
    "upload": _upload,
    "download": _download,
    "vdi": _vdi,
    "sr": _sr,
    "task": _task,
}
