"""The `vdi-transfer` command: `serve`; offline administration on a state dir (`user`,
`host`, `sr`, `vdi verify`); and the client of a server at --url (`login`, `upload`,
`download`, `vdi list ...`, `task ...`: transfer/client/)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common.errors import ApiError
from transfer import __version__, logs
from transfer.client.commands import add_commands, add_vdi_actions, client_options, is_remote
from transfer.config import Config, ConfigError, load


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (env VDIT_CONFIG)")
    parser.add_argument("--state-dir", type=Path, help="state directory (default ./data)")
    parser.add_argument("--database-url", help="sqlite:///PATH or postgresql://... (pools)")


def build_parser() -> argparse.ArgumentParser:
    """`serve`, and the offline commands: `user`, `host`, `sr`, `vdi verify`."""
    parser = argparse.ArgumentParser(
        prog="vdi-transfer", description="Move virtual disks in and out of storage over HTTP."
    )
    parser.add_argument("--version", action="version", version=f"vdi-transfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--advertise-url", help="base URL other hosts redirect clients to")
    serve.add_argument(
        "--tls-cert", type=Path, help="PEM certificate: serve HTTPS (with --tls-key)"
    )
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--upload-memory",
        help="bytes of upload bodies all transfers hold in memory together (e.g. 256M)",
    )
    limits = serve.add_argument_group("limits (0: none)")
    limits.add_argument("--max-transfers", type=int, help="transfers at once on this host")
    limits.add_argument("--max-user-transfers", type=int, help="transfers at once per user")
    limits.add_argument(
        "--idle-timeout", type=float, help="seconds a connection may move no byte (300)"
    )
    limits.add_argument(
        "--header-timeout", type=float, help="seconds to send a request's headers (60)"
    )
    limits.add_argument("--min-rate", help="bytes/s a body must average, e.g. 64K")
    limits.add_argument("--rate-window", type=float, help="seconds --min-rate averages over")
    limits.add_argument("--max-header-size", type=int, help="bytes of a header line (8190)")
    limits.add_argument("--max-json-body", help="bytes of a JSON request body (1M)")
    limits.add_argument("--coalesce-rate", help="bytes/s background merges may copy, e.g. 100M")
    serve.add_argument("--log-format", choices=["logfmt", "json"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    user = sub.add_parser("user", help="manage users offline (the server may be running)")
    user_sub = user.add_subparsers(dest="action", required=True)
    add = user_sub.add_parser("add", help="create a user")
    add.add_argument("username")
    add.add_argument("--role", default="reader", choices=["admin", "operator", "reader"])
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    passwd = user_sub.add_parser("passwd", help="set a user's password")
    passwd.add_argument("username")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    user_sub.add_parser("list", help="list users and their roles")
    remove = user_sub.add_parser("remove", help="remove a user")
    remove.add_argument("username")
    for p in (add, passwd, user_sub.choices["list"], remove):
        _common(p)

    host = sub.add_parser("host", help="the hosts of the pool")
    host_sub = host.add_subparsers(dest="action", required=True)
    _common(host_sub.add_parser("list", help="list hosts, their addresses and liveness"))

    sr = sub.add_parser("sr", help="storage repositories")
    sr_sub = sr.add_subparsers(dest="action", required=True)
    sr_list = sr_sub.add_parser("list", help="list SRs (offline, or on the server at --url)")
    _common(sr_list)
    client_options(sr_list)
    sr_create = sr_sub.add_parser(
        "create",
        help="add an SR: a directory local to this host, or (--shared) one every host mounts",
    )
    sr_create.add_argument("sr_path", metavar="PATH", help="the directory (absolute)")
    sr_create.add_argument(
        "--shared",
        dest="sr_shared",
        action="store_true",
        help="every host of the pool mounts PATH at the same place (NFS, say)",
    )
    sr_create.add_argument("--name-label", dest="sr_name", help="the SR's name")
    sr_create.add_argument(
        "--image-formats",
        dest="sr_formats",
        default="raw,vhd,qcow2",
        help="comma-separated runtime formats its VDIs may use (default raw,vhd,qcow2)",
    )
    sr_create.add_argument(
        "--default-image-format", dest="sr_default", default="raw", help="default raw"
    )
    _common(sr_create)

    vdi = sub.add_parser("vdi", help="virtual disks")
    vdi_sub = vdi.add_subparsers(dest="action", required=True)
    verify = vdi_sub.add_parser("verify", help="check that a VDI's files agree with its records")
    verify.add_argument("vdi", help="uuid or OpaqueRef")
    _common(verify)
    add_vdi_actions(vdi_sub)
    add_commands(sub)
    return parser


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise SystemExit("vdi-transfer: the passwords differ")
    return first


def _offline(config: Config, action: Callable[[Any], Awaitable[None]]) -> None:
    from auth.users import UserStore
    from transfer.db import open_database

    async def go() -> None:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        db = await open_database(config.database)
        try:
            await action(UserStore(db))
        finally:
            await db.close()

    asyncio.run(go())


def _user(args: argparse.Namespace, config: Config) -> None:
    if args.action == "list":

        async def show(users: Any) -> None:
            for row in await users.list():
                print(f"{row['username']}\t{row['role']}")

        _offline(config, show)
    elif args.action == "add":
        password = _read_password(args.password_stdin)
        _offline(config, lambda users: users.add(args.username, password, args.role))
        print(f"user {args.username} added with role {args.role}")
    elif args.action == "passwd":
        password = _read_password(args.password_stdin)
        _offline(config, lambda users: users.set_password(args.username, password))
        print(f"password of {args.username} changed")
    elif args.action == "remove":
        _offline(config, lambda users: users.remove(args.username))
        print(f"user {args.username} removed")


def _services_offline(config: Config, action: Callable[[Any], Awaitable[int]]) -> int:
    """Run `action(services)` against the state dir, without a server."""
    from transfer.app import open_services

    async def go() -> int:
        svc = await open_services(config)
        try:
            return await action(svc)
        finally:
            await svc.db.close()

    return asyncio.run(go())


def _host(args: argparse.Namespace, config: Config) -> int:
    async def show(svc: Any) -> int:
        print("uuid\tname_label\taddress\tlive\tlast_heartbeat")
        for row in await svc.hosts.list():
            info = svc.hosts.to_json(row)
            live = row["heartbeat"] > svc.hosts.heard_since()  # this CLI is no host
            print(
                f"{info['uuid']}\t{info['name_label']}\t{info['address']}\t{live}"
                f"\t{info['last_heartbeat']}"
            )
        return 0

    return _services_offline(config, show)


def _sr(args: argparse.Namespace, config: Config) -> int:
    if args.action == "create":

        async def create(svc: Any) -> int:
            row = await svc.srs.create(
                Path(args.sr_path),
                shared=args.sr_shared,
                name_label=args.sr_name,
                formats=[f.strip().lower() for f in args.sr_formats.split(",") if f.strip()],
                default_format=args.sr_default.lower(),
            )
            where = "shared by every host" if row["shared"] else f"local to host {row['host']}"
            print(f"{row['uuid']}\t{row['name_label']}\t{where}\t{row['path']}")
            return 0

        return _services_offline(config, create)

    async def show(svc: Any) -> int:
        print(
            "uuid\tname_label\ttype\tshared\tsupported_image_formats"
            "\tdefault_image_format\thost\tpath"
        )
        for row in await svc.srs.list():
            print(
                f"{row['uuid']}\t{row['name_label']}\t{row['type']}\t{bool(row['shared'])}"
                f"\t{','.join(svc.srs.formats(row))}\t{row['default_image_format']}"
                f"\t{row['host'] or '-'}\t{row['path']}"
            )
        return 0

    return _services_offline(config, show)


def _vdi(args: argparse.Namespace, config: Config) -> int:
    from transfer import verify
    from transfer.files import in_thread

    async def check(svc: Any) -> int:
        row = await svc.vdis.get(args.vdi)
        rows = await svc.vdis.chain_rows(row)
        files = await svc.vdis.chain_files(row)
        problems = await in_thread(verify.check_chain, rows, files)
        chain = " -> ".join(f"{r['uuid']} ({r['image_format']})" for r in rows)
        print(f"VDI {row['uuid']}: chain {chain}")
        for problem in problems:
            print(f"  PROBLEM: {problem}")
        print("  files and records agree" if not problems else f"  {len(problems)} problem(s)")
        return 1 if problems else 0

    return _services_offline(config, check)


def main(argv: list[str] | None = None) -> int:
    """The command's exit status: 1 on an API error, 2 on bad configuration, 130 if interrupted."""
    args = build_parser().parse_args(argv)
    if is_remote(args):
        from transfer.client.commands import run

        return run(args)
    options = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "action", "username", "role", "password_stdin", "vdi")
        and k not in ("url", "user", "cacert", "insecure", "json")
        and not k.startswith("sr_")
    }
    try:
        config = load(options)
    except ConfigError as exc:
        print(f"vdi-transfer: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            from transfer.server import serve
            from transfer.tls import TlsError, server_context

            try:
                tls = server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
            except TlsError as exc:
                print(f"vdi-transfer: configuration error: {exc}", file=sys.stderr)
                return 2
            logs.setup(config.log_format, config.log_level)
            serve(config, tls, reload=lambda: load(options))
        elif args.command == "user":
            _user(args, config)
        elif args.command == "sr":
            return _sr(args, config)
        elif args.command == "host":
            return _host(args, config)
        elif args.command == "vdi":
            return _vdi(args, config)
    except ApiError as exc:
        print(f"vdi-transfer: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
