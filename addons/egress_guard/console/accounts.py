"""Accounts: who may use the console and the admin API, and with which roles.

The rules split the admin powers between different people, so there are three roles and no
role implies another:

- ``admin``: runs the gateway (status, console events).
- ``auditor``: reads the request log.
- ``approver``: grants exceptions.

The account file (``<data-dir>/accounts.json``, mode 0600) is written by ``egress-guard
account …`` on the gateway host. The gateway re-reads it when it changes, so a revoked role or
a removed account takes effect at the next request. Every change is also appended to a journal
(``accounts-changes.jsonl``: who, when, which account, what changed). The gateway copies the
journal into the console's event log, because the rules ask for permission changes to be
logged.

Passwords are kept as scrypt hashes, which are slow on purpose. API tokens are kept as
SHA-256: they are 256-bit random strings, so a fast hash is enough and a lookup stays cheap.
"""

from __future__ import annotations

import base64
import fcntl
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydantic

ROLES = ("admin", "approver", "auditor")
ACCOUNTS_FILE = "accounts.json"
MIN_PASSWORD_CHARS = 12
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")

# scrypt at n=2**14, r=8 costs about 16 MiB and 40 ms per check: cheap for one login,
# expensive for a stolen file.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 << 20


class AccountError(ValueError):
    """A refused account change or an unreadable account file; the message is for the admin."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


# Checked when the account does not exist or has no password, so that a wrong user name
# costs the same time as a wrong password and names cannot be probed by timing.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def verify_password(password: str, stored: str) -> bool:
    real = bool(stored)
    try:
        _, n, r, p, salt, digest = (stored or _DUMMY_HASH).split("$")
        computed = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_SCRYPT_MAXMEM,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest)) and real


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _Entry(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    roles: list[str]
    password: str = ""  # scrypt hash; "" = no console login (API token only)
    tokens: list[str] = []  # SHA-256 of the account's API tokens

    @pydantic.field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: list[str]) -> list[str]:
        return sorted(validate_roles(roles))  # the CLI's check, for a hand-edited file too


def _accounts_of(entries: dict[str, _Entry]) -> dict[str, Account]:
    return {
        name: Account(name, frozenset(e.roles), e.password, tuple(e.tokens))
        for name, e in entries.items()
    }


class _File(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    accounts: dict[str, _Entry] = {}


@dataclass(frozen=True)
class Account:
    name: str
    roles: frozenset[str]
    password_hash: str
    token_digests: tuple[str, ...]

    @property
    def stamp(self) -> str:
        """Changes when the password does: sessions opened before a password change end."""
        return token_digest(self.password_hash)[:16]


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise AccountError(
            f"account name {name!r}: use 1–64 lower-case letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )
    return name


def validate_roles(roles: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(roles)
    if not chosen:
        raise AccountError(f"give at least one role: {', '.join(ROLES)}")
    unknown = sorted(chosen - set(ROLES))
    if unknown:
        raise AccountError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")
    return chosen


def validate_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    return password


class AccountBook:
    """The account file: read (and re-read when it changes) by the gateway, written by the CLI.

    Writers take an exclusive lock on a side file and replace the account file atomically, so
    a reader sees the old file or the new one, never half of one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen: tuple[int, int, int] | str | None = "never read"
        self._accounts: dict[str, Account] = {}
        self._by_token: dict[str, Account] = {}
        self._lock = threading.Lock()

    # --- reading ---

    def _parse(self) -> dict[str, Account]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            parsed = _File.model_validate(raw)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # pydantic.ValidationError is a ValueError
            raise AccountError(f"{self.path}: unreadable account file: {e}") from None
        for name in parsed.accounts:
            validate_name(name)
        return _accounts_of(parsed.accounts)

    def refresh(self) -> None:
        """Re-read the file if it changed since the last look (a stat per call). A broken
        file keeps the last good accounts and raises AccountError."""
        try:
            st = self.path.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)  # a write makes a new inode
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen == self._seen:
                return
            accounts = self._parse()
            self._accounts = accounts
            self._by_token = {d: a for a in accounts.values() for d in a.token_digests}
            self._seen = seen

    def get(self, name: str) -> Account | None:
        self.refresh()
        return self._accounts.get(name)

    def by_token(self, token: str) -> Account | None:
        self.refresh()
        return self._by_token.get(token_digest(token))

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.stem + "-changes.jsonl")

    @property
    def _recorded_path(self) -> Path:
        return self.path.with_name(self.path.stem + "-changes.recorded")

    def unrecorded_changes(self) -> list[tuple[dict[str, str], int]]:
        """Journal entries not yet marked recorded, each with the offset just after it."""
        try:
            offset = int(self._recorded_path.read_text().strip() or 0)
        except (OSError, ValueError):
            offset = 0
        try:
            with open(self.journal_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return []
        entries = []
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # being written: next time
            offset += len(line)
            try:
                entries.append((json.loads(line), offset))
            except ValueError:  # a damaged line is skipped, not a reason to stop
                continue
        return entries

    def mark_recorded(self, offset: int) -> None:
        tmp = self._recorded_path.with_suffix(".tmp")
        _write_private(tmp, str(offset), "w")
        os.replace(tmp, self._recorded_path)

    def all(self) -> list[Account]:
        self.refresh()
        return sorted(self._accounts.values(), key=lambda a: a.name)

    # --- writing (the CLI, on the gateway host) ---

    @contextmanager
    def _editing(self) -> Iterator[dict[str, _Entry]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._parse()
            entries = {
                a.name: _Entry(
                    roles=sorted(a.roles), password=a.password_hash, tokens=list(a.token_digests)
                )
                for a in current.values()
            }
            yield entries
            document = {"accounts": {k: v.model_dump() for k, v in sorted(entries.items())}}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            _write_private(tmp, json.dumps(document, indent=1) + "\n", "w")
            os.replace(tmp, self.path)
            # The journal: one line per permission change, for the console's event log.
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            lines = "".join(
                json.dumps({"ts": now, "by": getpass.getuser(), **change}, sort_keys=True) + "\n"
                for change in diff_accounts(current, _accounts_of(entries))
            )
            _write_private(self.journal_path, lines, "a")
        self._seen = "stale"

    def _existing(self, entries: dict[str, _Entry], name: str) -> _Entry:
        if name not in entries:
            raise AccountError(f"no account named {name!r}")
        return entries[name]

    def add(self, name: str, roles: Iterable[str], password: str | None = None) -> None:
        validate_name(name)
        chosen = validate_roles(roles)
        hashed = hash_password(validate_password(password)) if password is not None else ""
        with self._editing() as entries:
            if name in entries:
                raise AccountError(f"account {name!r} exists already")
            entries[name] = _Entry(roles=sorted(chosen), password=hashed)

    def set_roles(self, name: str, roles: Iterable[str]) -> None:
        chosen = validate_roles(roles)
        with self._editing() as entries:
            self._existing(entries, name).roles = sorted(chosen)

    def set_password(self, name: str, password: str) -> None:
        hashed = hash_password(validate_password(password))
        with self._editing() as entries:
            self._existing(entries, name).password = hashed

    def issue_token(self, name: str) -> str:
        """A new API token for the account; shown once, only its hash is kept."""
        token = "egt_" + secrets.token_urlsafe(32)
        with self._editing() as entries:
            self._existing(entries, name).tokens.append(token_digest(token))
        return token

    def revoke_tokens(self, name: str) -> None:
        with self._editing() as entries:
            self._existing(entries, name).tokens = []

    def remove(self, name: str) -> None:
        with self._editing() as entries:
            self._existing(entries, name)
            del entries[name]


def _write_private(path: Path, text: str, mode: str) -> None:
    """Write (``w``) or append (``a``) with mode 0600, then fsync."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, mode, encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def diff_accounts(old: dict[str, Account], new: dict[str, Account]) -> list[dict[str, str]]:
    """What changed between two readings of the file: one entry per account and kind of
    change, never a password or token (only that one was set, issued or revoked)."""
    changes = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None and after is not None:
            changes.append({"account": name, "change": "added", "roles": _roles(after)})
        elif after is None and before is not None:
            changes.append({"account": name, "change": "removed", "roles": _roles(before)})
        elif before is not None and after is not None:
            if before.roles != after.roles:
                change = f"roles {_roles(before)} -> {_roles(after)}"
                changes.append({"account": name, "change": change, "roles": _roles(after)})
            if before.password_hash != after.password_hash:
                changes.append({"account": name, "change": "password set", "roles": _roles(after)})
            issued = len(set(after.token_digests) - set(before.token_digests))
            revoked = len(set(before.token_digests) - set(after.token_digests))
            for n, what in ((issued, "issued"), (revoked, "revoked")):
                if n:
                    change = f"{n} API token(s) {what}"
                    changes.append({"account": name, "change": change, "roles": _roles(after)})
    return changes


def _roles(account: Account) -> str:
    return ",".join(sorted(account.roles))


def accounts_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / ACCOUNTS_FILE
