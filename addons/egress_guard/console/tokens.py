"""The bootstrap admin token: written once to the data directory, it stands for an admin."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

TOKEN_FILE = "admin-token"
BOOTSTRAP_NAME = "admin-token"  # the principal the bootstrap token stands for


def token_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / TOKEN_FILE


def ensure_admin_token(data_dir: str | Path) -> tuple[str, bool]:
    """The bootstrap admin token (created with mode 0600 on first start); (token, created)."""
    path = token_path(data_dir)
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def is_bootstrap_token(given: str, bootstrap: str) -> bool:
    # Constant time: the comparison must not tell a guesser how much of the token was right.
    return hmac.compare_digest(given.encode(), bootstrap.encode())
