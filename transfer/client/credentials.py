"""Who the client is, for a server URL: --user with a password (VDIT_PASSWORD, or asked
on the terminal), VDIT_USER and VDIT_PASSWORD, or the session `vdi-transfer login` saved
in the user's config dir (a 0600 file: a session id is as good as the password until it
expires or `logout` revokes it)."""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import os
import sys
from pathlib import Path

from transfer.client.http import ClientError


def sessions_file() -> Path:
    """$XDG_CONFIG_HOME/vdi-transfer/sessions.json: {server URL: session id}."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vdi-transfer" / "sessions.json"


def _load() -> dict[str, str]:
    try:
        data = json.loads(sessions_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(sessions: dict[str, str]) -> None:
    path = sessions_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(sessions, f, indent=1)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def saved_session(url: str) -> str | None:
    """The session `login` saved for the server, if any."""
    return _load().get(url)


def save_session(url: str, session_id: str) -> Path:
    """Keep the session for the server (mode 0600, written whole); the file's path."""
    sessions = _load()
    sessions[url] = session_id
    _store(sessions)
    return sessions_file()


def forget_session(url: str) -> None:
    """Drop the server's saved session (`logout`)."""
    sessions = _load()
    if sessions.pop(url, None) is not None:
        _store(sessions)


def basic(user: str, password: str) -> str:
    """A Basic Authorization header."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def password_for(user: str) -> str:
    """VDIT_PASSWORD, or asked on the terminal; NO_CREDENTIALS without either."""
    password = os.environ.get("VDIT_PASSWORD")
    if password is not None:
        return password
    if not sys.stdin.isatty():
        raise ClientError("NO_CREDENTIALS", f"no password for {user}: set VDIT_PASSWORD")
    with contextlib.suppress(EOFError):
        return getpass.getpass(f"Password for {user}: ")
    raise ClientError("NO_CREDENTIALS", f"no password for {user}")


def authorization(url: str, user: str | None) -> str:
    """The Authorization header to use with the server at `url`."""
    if user:
        return basic(user, password_for(user))
    env_user = os.environ.get("VDIT_USER")
    if env_user:
        return basic(env_user, password_for(env_user))
    session = saved_session(url)
    if session:
        return f"Bearer {session}"
    raise ClientError(
        "NO_CREDENTIALS",
        f"no credentials for {url}: give --user, set VDIT_USER and VDIT_PASSWORD, "
        "or run vdi-transfer login",
    )
