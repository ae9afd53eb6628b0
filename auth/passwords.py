"""Password hashing with the standard library's scrypt (memory-hard, no extra dependency).

Hashes are self-describing (``scrypt$N$r$p$salt$hash``) so the cost can be raised later and
old hashes still verify. Hashing costs tens of milliseconds: call it off the event loop, in
HASHING, a thread of its own, so that a flood of logins never holds up the threads that move
disk bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from concurrent.futures import ThreadPoolExecutor

# OWASP's scrypt alternative for 16 MiB of memory: N=2^14, r=8, p=5.
N, R, P = 2**14, 8, 5
MIN_LENGTH = 8
MAX_LENGTH = 1024
HASHING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="password")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * r * n * 2
    )


def hash_password(password: str) -> str:
    """A new scrypt hash of `password` with a fresh salt, in the stored form."""
    salt = os.urandom(16)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(_scrypt(password, salt, N, R, P))}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of `password` against a stored hash; False for any malformed hash."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# Verified against when the user does not exist, so that a wrong user name costs the same
# time as a wrong password and timing does not reveal which user names exist.
DUMMY_HASH = hash_password(os.urandom(16).hex())


def check_strength(password: str) -> str | None:
    """Why `password` is unacceptable, or None."""
    if len(password) < MIN_LENGTH:
        return f"password must have at least {MIN_LENGTH} characters"
    if len(password) > MAX_LENGTH:
        return f"password must have at most {MAX_LENGTH} characters"
    return None
