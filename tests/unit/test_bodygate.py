"""The body gate, in process: mitmproxy's HTTP layer driven event by event with the gateway's
addon, asserting on what the layer sends the upstream and when — nothing of a body before its
verdict — and on the held body's private file."""

import stat

import pytest

from egress_guard.runtime import bodygate, protocol_errors
from egress_guard.runtime.addon import EgressGuard
from egress_guard.runtime.heldbody import HeldBody, HoldSpec
from layer_driver import Proxy
from support import FakeRuntime

MARK = "机密★5年".encode()
HOST = "93.184.216.34"  # a public address: the destination rules let it through
HEAD = (
    f"POST http://{HOST}/up HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
).encode()


@pytest.fixture(autouse=True, scope="module")
def patched():
    bodygate.install()
    protocol_errors.install()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def proxy(tmp_path, memory_bytes: int = 1 << 20) -> tuple[Proxy, FakeRuntime]:
    rt = FakeRuntime(tmp_path / "held")
    rt.hold = HoldSpec(tmp_path / "held", memory_bytes=memory_bytes)
    return Proxy(addon=EgressGuard(rt)), rt


def test_a_marked_chunked_body_never_reaches_the_upstream(tmp_path):
    p, _ = proxy(tmp_path)
    p.send(HEAD + chunk(MARK + b"\n"))
    p.send(chunk(b"more text\n"))
    assert not p.servers  # no connection while the body is held
    p.send(b"0\r\n\r\n")
    assert p.to_client().startswith(b"HTTP/1.1 403")
    assert not p.servers and p.to_server() == b""


def dechunked(message: bytes) -> bytes:
    """The body of a chunked HTTP/1 message."""
    _, _, rest = message.partition(b"\r\n\r\n")
    body = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return body
        body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]


def test_a_clean_body_is_forwarded_whole_after_its_verdict_and_not_before(tmp_path):
    p, rt = proxy(tmp_path)
    body = [b"quarterly figures\n" * 100, b"more\n" * 100]
    p.send(HEAD + chunk(body[0]))
    p.send(chunk(body[1]))
    assert not p.servers  # held: no connection, no headers yet
    p.send(b"0\r\n\r\n")
    sent = p.to_server()
    assert sent.startswith(b"POST /up HTTP/1.1\r\n") and dechunked(sent) == b"".join(body)
    p.server_says(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    (row,) = rt.rows
    assert row.decision == "allow" and row.forwarded_bytes == row.upload_bytes == 2300


def test_a_large_held_body_waits_in_a_private_file_deleted_after(tmp_path):
    p, _ = proxy(tmp_path, memory_bytes=1024)
    p.send(HEAD + chunk(b"x" * 5000))
    spilled = list((tmp_path / "held").glob("held-*"))
    assert len(spilled) == 1
    assert stat.S_IMODE(spilled[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "held").stat().st_mode) == 0o700
    p.send(chunk(MARK) + b"0\r\n\r\n")
    assert p.to_client().startswith(b"HTTP/1.1 403") and not p.servers
    assert not list((tmp_path / "held").glob("held-*"))  # the refusal released it


def test_the_row_says_what_the_upstream_got(tmp_path):
    p, rt = proxy(tmp_path)
    p.send(HEAD + chunk(MARK) + b"0\r\n\r\n")
    (row,) = rt.rows
    assert (row.decision, row.forwarded_bytes, row.upload_bytes) == ("block", 0, len(MARK))


def test_a_body_over_the_hold_is_unscannable_and_refused_by_default(tmp_path):
    p, rt = proxy(tmp_path)
    rt.hold = HoldSpec(tmp_path / "held", memory_bytes=1024, max_bytes=4096)
    p.send(HEAD + chunk(b"y" * 5000))
    assert p.to_client().startswith(b"HTTP/1.1 403") and not p.servers
    (row,) = rt.rows
    assert row.decision == "block" and row.error.startswith("unscannable")


def test_held_body_in_memory_then_file_in_order(tmp_path):
    spec = HoldSpec(tmp_path / "held", memory_bytes=10)
    spec.prepare()
    held = HeldBody(spec)
    for piece in (b"0123456789", b"abcdef", b"XYZ" * 100_000):
        held.append(piece)
    assert held.spilled and held.size == 16 + 300_000
    assert b"".join(held.chunks()) == b"0123456789abcdef" + b"XYZ" * 100_000
    path = held.path
    assert path is not None and path.exists()
    held.release()
    assert not path.exists()
    held.release()  # twice is fine


def test_prepare_removes_what_a_crash_left(tmp_path):
    spec = HoldSpec(tmp_path / "held")
    spec.prepare()
    (tmp_path / "held" / "held-leftover").write_bytes(b"secret")
    spec.prepare()
    assert not list((tmp_path / "held").iterdir())


def test_install_refuses_another_mitmproxy(monkeypatch):
    from mitmproxy import version

    monkeypatch.setattr(version, "VERSION", "12.0.0")
    with pytest.raises(RuntimeError, match=r"written for mitmproxy 11\.0\.2"):
        bodygate.install()
