"""Accounts: password and token storage, validation, and the gateway seeing CLI changes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from egress_guard.console.accounts import (
    AccountBook,
    AccountError,
    hash_password,
    token_digest,
    verify_password,
)

PASSWORD = "correct horse battery"


def test_a_password_is_stored_as_a_salted_scrypt_hash_and_checked_in_constant_form():
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first.startswith("scrypt$") and PASSWORD not in first
    assert first != second  # salted
    assert verify_password(PASSWORD, first)
    assert not verify_password(PASSWORD + "!", first)
    assert not verify_password(PASSWORD, "")  # no password set: never a match
    assert not verify_password(PASSWORD, "scrypt$garbage")


def test_the_file_holds_hashes_only_and_is_private(tmp_path):
    book = AccountBook(tmp_path / "accounts.json")
    book.add("alice", ["auditor"], PASSWORD)
    token = book.issue_token("alice")
    text = (tmp_path / "accounts.json").read_text()
    assert PASSWORD not in text and token not in text and token_digest(token) in text
    assert stat.S_IMODE(os.stat(tmp_path / "accounts.json").st_mode) == 0o600
    assert book.by_token(token).name == "alice"
    assert book.by_token(token + "x") is None


def test_changes_written_by_another_process_are_seen_at_the_next_lookup(tmp_path):
    gateway_view = AccountBook(tmp_path / "accounts.json")
    assert gateway_view.get("alice") is None
    cli = AccountBook(tmp_path / "accounts.json")
    cli.add("alice", ["auditor"], PASSWORD)
    token = cli.issue_token("alice")
    assert gateway_view.get("alice").roles == {"auditor"}
    cli.set_roles("alice", ["approver"])
    assert gateway_view.get("alice").roles == {"approver"}  # a revoked role is gone at once
    stamp = gateway_view.get("alice").stamp
    cli.set_password("alice", PASSWORD + " new")
    assert gateway_view.get("alice").stamp != stamp  # sessions opened before it end
    cli.revoke_tokens("alice")
    assert gateway_view.by_token(token) is None
    cli.remove("alice")
    assert gateway_view.get("alice") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.add("Alice Smith", ["auditor"]), "account name"),
        (lambda b: b.add("bob", []), "at least one role"),
        (lambda b: b.add("bob", ["root"]), "unknown role"),
        (lambda b: b.add("bob", ["auditor"], "short"), "at least 12 characters"),
        (lambda b: b.add("carol", ["admin"]), "exists already"),
        (lambda b: b.set_roles("nobody", ["admin"]), "no account named"),
        (lambda b: b.issue_token("nobody"), "no account named"),
    ],
)
def test_bad_changes_are_refused_with_a_reason_and_change_nothing(tmp_path, call, message):
    book = AccountBook(tmp_path / "accounts.json")
    book.add("carol", ["admin"])
    before = (tmp_path / "accounts.json").read_text()
    with pytest.raises(AccountError, match=message):
        call(book)
    assert (tmp_path / "accounts.json").read_text() == before


def test_a_broken_file_is_reported_and_the_last_good_accounts_stay(tmp_path):
    path = tmp_path / "accounts.json"
    book = AccountBook(path)
    book.add("carol", ["admin"])
    assert book.get("carol") is not None
    path.write_text(json.dumps({"accounts": {"carol": {"roles": ["superuser"]}}}))
    with pytest.raises(AccountError, match="unknown role"):
        book.get("carol")
    path.write_text("{not json")
    with pytest.raises(AccountError, match="unreadable account file"):
        book.refresh()
    assert book._accounts["carol"].roles == {"admin"}  # kept, not emptied


def test_every_change_is_journaled_once_and_without_secrets(tmp_path):
    book = AccountBook(tmp_path / "accounts.json")
    book.add("alice", ["auditor"], PASSWORD)
    token = book.issue_token("alice")
    book.set_roles("alice", ["auditor", "approver"])
    book.set_password("alice", PASSWORD + " 2")
    book.revoke_tokens("alice")
    book.remove("alice")
    got = book.unrecorded_changes()
    assert [c["change"] for c, _ in got] == [
        "added",
        "1 API token(s) issued",
        "roles auditor -> approver,auditor",
        "password set",
        "1 API token(s) revoked",
        "removed",
    ]
    assert all(c["account"] == "alice" and c["by"] and c["ts"] for c, _ in got)
    journal = book.journal_path.read_text()
    assert PASSWORD not in journal and token not in journal and token_digest(token) not in journal
    book.mark_recorded(got[2][1])  # the first three are in the event log
    assert next(c["change"] for c, _ in book.unrecorded_changes()) == "password set"
    book.mark_recorded(got[-1][1])
    assert book.unrecorded_changes() == []
    with open(book.journal_path, "a") as f:
        f.write('{"account": "half-writ')  # a line still being written waits
    assert book.unrecorded_changes() == []
