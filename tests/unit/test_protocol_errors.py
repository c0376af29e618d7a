"""Protocol errors, in process: mitmproxy's HTTP layer driven event by event (a small stand-in
for the Playbook of mitmproxy's own test suite, which the wheel does not ship), with the
gateway's patches installed as ``egress-guard run`` installs them."""

from __future__ import annotations

import time

import h2.events
import pytest
from mitmproxy import connection, options, version
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, context, events, layer
from mitmproxy.proxy.layers.http import HttpErrorHook, HttpRequestHeadersHook

from egress_guard.runtime import bodygate, protocol_errors
from egress_guard.runtime.protocol_errors import ProtocolErrorData, ProtocolErrorHook
from layer_driver import H2Client, Proxy


@pytest.fixture(autouse=True, scope="module")
def patched():
    bodygate.install()
    protocol_errors.install()


def h2_head(method: bytes = b"GET", path: bytes = b"/x", authority: bytes = b"example.com"):
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", authority),
        (b":path", path),
    ]


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- trailers: forwarded, not a crash ---------------------------------------------------------


def test_http1_chunked_request_with_trailers_reaches_the_upstream_with_them():
    p = Proxy()
    p.send(
        b"POST http://example.com/up HTTP/1.1\r\nHost: example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    assert p.to_server().endswith(b"\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n")
    p.server_says(OK_RESPONSE)
    assert p.to_client().startswith(b"HTTP/1.1 200 OK") and p.to_client().endswith(b"ok")
    assert not p.refusals()


def test_http1_response_trailers_reach_the_http1_client():
    p = Proxy()
    p.send(b"GET http://example.com/t HTTP/1.1\r\nHost: example.com\r\n\r\n")
    p.server_says(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\nContent-Length: 9\r\n\r\n"
    )
    answer = p.to_client()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    # the trailer is passed on; a framing field in the trailer section is not
    assert answer.endswith(b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\n\r\n")


def test_http2_request_trailers_to_an_http1_upstream_go_into_the_last_chunk():
    p = Proxy(alpn=b"h2")
    c = H2Client(p)
    c.request(h2_head(b"POST", b"/grpc"), b"hello", trailers=[(b"x-checksum", b"abc")])
    upstream = p.to_server()
    assert b"transfer-encoding: chunked\r\n" in upstream.lower()
    assert upstream.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n")
    p.server_says(OK_RESPONSE)
    c.flush()
    assert c.status() == b"200"


def test_http2_request_trailers_with_a_content_length_are_dropped_not_a_crash():
    p = Proxy(alpn=b"h2")
    c = H2Client(p)
    c.request([*h2_head(b"POST"), (b"content-length", b"5")], b"hello", [(b"x-checksum", b"abc")])
    assert p.to_server().endswith(b"content-length: 5\r\n\r\nhello")
    p.server_says(OK_RESPONSE)
    c.flush()
    assert c.status() == b"200"


def test_a_trailer_section_without_end_is_cut_at_the_cap():
    p = Proxy()
    p.send(
        b"POST http://example.com/up HTTP/1.1\r\nHost: example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    )
    filler = b"X-Fill: " + b"a" * 1000 + b"\r\n"
    for _ in range(protocol_errors.MAX_TRAILER_SECTION // len(filler) + 2):
        p.send(filler)
        if p.closed():
            break
    assert p.closed()
    [error] = p.hooks(HttpErrorHook)
    assert "trailer section larger than" in error.flow.error.msg


# --- HTTP/2 to HTTP/1 framing -----------------------------------------------------------------


def test_an_http2_body_without_length_is_framed_for_the_http1_upstream():
    """Not framed, the body would be the upstream's next request: smuggled past the log."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: mail.qq.com\r\n\r\n"
    p = Proxy(alpn=b"h2")
    c = H2Client(p)
    c.request(h2_head(b"GET", b"/getbody"), smuggled)
    head, _, body = p.to_server().partition(b"\r\n\r\n")
    assert head.startswith(b"GET /getbody HTTP/1.1\r\n")
    assert f"content-length: {len(smuggled)}".encode() in head.lower()
    assert body == smuggled


# --- HTTP/2: malformed requests ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ([(b"x-a", b"1\r\nX-Injected: yes")], b"/x"),
        ([(b"x-a", b"1\nX-Injected: yes")], b"/x"),
        ([(b"x-a", b"nul\x00byte")], b"/x"),
        ([], b"/x HTTP/1.1\r\nHost: mail.qq.com\r\n\r\nGET /"),
        ([], b"/x y"),
    ],
    ids=["crlf-value", "lf-value", "nul-value", "crlf-path", "space-path"],
)
def test_http2_fields_that_would_inject_into_http1_are_refused_on_their_stream(extra, path):
    p = Proxy(alpn=b"h2")
    c = H2Client(p)
    c.request(h2_head(b"GET", path) + extra)
    assert c.status() == b"400"
    assert not p.servers  # nothing reached an upstream
    assert not p.hooks(HttpRequestHeadersHook)
    [refusal] = p.refusals()
    assert refusal.status == 400 and refusal.http_version == "HTTP/2.0"
    assert refusal.method == "GET" and refusal.host == "example.com"
    assert "CR, LF or NUL" in refusal.reason or "whitespace" in refusal.reason
    assert "X-Injected" not in refusal.reason  # names, never values
    # the connection lives on: the next request on it is served
    c.request(h2_head(b"GET", b"/next"), stream_id=3)
    assert p.to_server().startswith(b"GET /next HTTP/1.1\r\n")


def test_malformed_http2_trailers_fail_their_flow():
    p = Proxy(alpn=b"h2")
    c = H2Client(p)
    c.request(h2_head(b"POST"), b"hello", trailers=[(b"x-t", b"a\r\nb: c")])
    [error] = p.hooks(HttpErrorHook)
    assert "CR, LF or NUL" in error.flow.error.msg
    assert c.events(h2.events.StreamReset)
    assert not p.refusals()  # the flow's error hook records it, not a second row


@pytest.mark.parametrize(
    ("headers", "reason", "expected"),
    [
        (
            [*h2_head(b"POST", b"/u"), (b"X-Upper", b"1")],
            "uppercase",
            {"method": "POST", "host": "example.com", "path": "/u"},
        ),
        (
            [*h2_head(), (b"connection", b"keep-alive")],
            "connection",
            {"method": "GET", "path": "/x"},
        ),
        (
            [*h2_head(), (b"transfer-encoding", b"chunked")],
            "transfer-encoding",
            {"method": "GET", "path": "/x"},
        ),
        (h2_head()[:3], ":path", {"method": "GET", "host": "example.com", "path": ""}),
        ([*h2_head(), (b":foo", b"bar")], "pseudo", {"method": "GET", "path": "/x"}),
        (
            [(b":method", b"GET"), (b"x-a", b"1"), *h2_head()[1:]],
            "pseudo",
            {"method": "GET", "path": "/x"},
        ),
        (
            [*h2_head(b"POST", b"/ws"), (b"authorization", b" Bearer s3cret")],
            "whitespace",
            {"method": "POST", "path": "/ws"},
        ),
        (
            h2_head(authority=b"mail%2eqq.com"),
            "Invalid HTTP/2 request headers",
            {"host": "mail.qq.com", "path": "/x"},
        ),
        (
            [(b":method", b"CONNECT"), (b":authority", b"mail.qq.com:443")],
            ":path",
            {"method": "CONNECT", "host": "mail.qq.com", "port": 443},
        ),
    ],
    ids=[
        "uppercase",
        "connection",
        "transfer-encoding",
        "no-path",
        "unknown-pseudo",
        "pseudo-after-regular",
        "value-whitespace",
        "percent-authority",
        "h2-connect",
    ],
)
def test_malformed_http2_requests_get_a_goaway_and_a_hook(headers, reason, expected):
    p = Proxy(alpn=b"h2")
    c = H2Client(p)
    c.request(headers)
    assert c.events(h2.events.ConnectionTerminated)
    assert not p.hooks(HttpRequestHeadersHook) and not p.servers
    [refusal] = p.refusals()
    assert refusal.status == 0 and refusal.http_version == "HTTP/2.0"
    assert reason.lower() in refusal.reason.lower(), refusal.reason
    assert "s3cret" not in refusal.reason
    for key, value in expected.items():
        assert getattr(refusal, key) == value, (key, refusal)


def test_a_goaway_with_flows_open_is_recorded_by_those_flows_and_the_refused_one():
    p = Proxy(alpn=b"h2")
    c = H2Client(p)
    c.request(h2_head(b"POST", b"/slow"), b"part", end=False)  # stream 1: a flow, body open
    c.request([*h2_head(b"GET", b"/bad"), (b"Bad", b"1")], stream_id=3)
    [error] = p.hooks(HttpErrorHook)
    assert error.flow.request.path == "/slow"
    [refusal] = p.refusals()
    assert refusal.path == "/bad"


def test_an_http2_connection_error_without_any_request_is_recorded():
    p = Proxy(alpn=b"h2")
    p.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")  # HTTP/1 where h2 was agreed
    [refusal] = p.refusals()
    assert refusal.status == 0 and "HTTP/2 protocol error" in refusal.reason
    assert refusal.http_version == "HTTP/2.0" and not refusal.host


# --- HTTP/1: refused before a flow exists -----------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GARBAGE\r\n\r\n", {"method": "GARBAGE", "request_line": "GARBAGE"}),
        (
            b"GET http://mail%2eqq.com/inbox HTTP/1.1\r\nHost: mail.qq.com\r\n\r\n",
            {"method": "GET", "host": "mail.qq.com", "path": "/inbox", "scheme": "http"},
        ),
        (
            "GET http://ｍａｉｌ.qq.com/ HTTP/1.1\r\nHost: mail.qq.com\r\n\r\n".encode(),
            {"host": "ｍａｉｌ.qq.com", "path": "/", "http_version": "HTTP/1.1"},
        ),
        (
            b"GET http://example.com:99999/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            {"host": "example.com", "port": 0},
        ),
        (b"GET ftp://example.com/ HTTP/1.1\r\n\r\n", {"scheme": "ftp", "host": "example.com"}),
        (b"GET /\r\n\r\n", {"method": "GET", "path": "/"}),
        (
            b"CONNECT mail.qq.com HTTP/1.1\r\nHost: mail.qq.com\r\n\r\n",
            {"method": "CONNECT", "host": "mail.qq.com", "port": 0},
        ),
        (
            b"GET /inbox HTTP/1.1\r\nHost: mail.qq.com\r\nAuthorization Bearer s3cret\r\n\r\n",
            {"method": "GET", "host": "mail.qq.com", "path": "/inbox"},
        ),
        (
            b"GET http://me:s3cret@mail.qq.com/ HTTP/1.1\r\n\r\n",
            {
                "host": "mail.qq.com",
                "path": "/",
                "request_line": "GET http://…@mail.qq.com/ HTTP/1.1",
            },
        ),
    ],
    ids=[
        "garbage",
        "percent-host",
        "fullwidth-host",
        "bad-port",
        "ftp",
        "http09",
        "connect-no-port",
        "header-line",
        "userinfo",
    ],
)
def test_http1_heads_mitmproxy_cannot_parse_get_a_400_and_a_hook(head, expected):
    p = Proxy()
    p.send(head)
    assert p.to_client().startswith(b"HTTP/1.1 400 Bad Request") and p.closed()
    assert not p.hooks(HttpRequestHeadersHook) and not p.servers
    [refusal] = p.refusals()
    assert refusal.status == 400 and refusal.client is p.client
    for key, value in expected.items():
        assert getattr(refusal, key) == value, (key, refusal)
    assert "s3cret" not in refusal.reason and "s3cret" not in refusal.request_line


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
    ],
    ids=["none", "space", "bracket"],
)
def test_http1_requests_without_a_usable_host_get_a_400_and_a_hook(head):
    p = Proxy()
    p.send(head)
    assert p.to_client().startswith(b"HTTP/1.1 400 Bad Request")
    assert not p.hooks(HttpRequestHeadersHook) and not p.servers
    [refusal] = p.refusals()
    assert refusal.status == 400 and refusal.method == "GET" and refusal.path == "/"
    assert "no host header" in refusal.reason


WITH_A_FLOW = [  # refused by mitmproxy after it made a flow: requestheaders + error fire
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: abc\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Bad Header: y\r\n",
]
WITHOUT_A_FLOW = [  # refused before: only the protocol-error hook tells
    b"GET http://mail%2eqq.com/ HTTP/1.1\r\n",
    "GET http://ｍａｉｌ.qq.com/ HTTP/1.1\r\n".encode(),
    b"GET / HTTP/1.1\r\n",  # no Host
    b"POST http://example.com/s HTTP/1.1\r\nNoColon\r\n",
]


def test_every_refused_http1_request_is_reported_exactly_once():
    """One record each: the flow's error hook, or the protocol-error hook; never both."""
    for head in [
        *(b"POST http://example.com/s HTTP/1.1\r\nHost: example.com\r\n" + h for h in WITH_A_FLOW),
        *WITHOUT_A_FLOW,
    ]:
        p = Proxy()
        p.send(head + b"\r\n")
        assert p.to_client().startswith(b"HTTP/1.1 400 Bad Request"), head
        reports = len(p.hooks(HttpErrorHook)) + len(p.refusals())
        assert reports == 1, (head, p.hooks(HttpErrorHook), p.refusals())
        assert bool(p.hooks(HttpRequestHeadersHook)) == bool(p.hooks(HttpErrorHook)), head


def test_a_head_over_the_cap_gets_431_and_a_hook():
    p = Proxy()
    p.send(b"GET http://example.com/big HTTP/1.1\r\nHost: example.com\r\n")
    filler = b"X-Fill: " + b"a" * 8000 + b"\r\n"
    while not p.closed():
        p.send(filler)
    assert p.to_client().startswith(b"HTTP/1.1 431")
    [refusal] = p.refusals()
    assert refusal.status == 431 and refusal.path == "/big" and refusal.host == "example.com"
    assert "larger than" in refusal.reason


def test_a_client_closing_inside_its_head_is_recorded_one_closing_between_requests_not():
    p = Proxy()
    p.send(b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\n\r\n")
    p.server_says(OK_RESPONSE)
    p.feed(events.ConnectionClosed(p.client))  # keep-alive, idle: not an error
    half = Proxy()
    half.send(b"POST http://example.com/half HTTP/1.1\r\nHost: exa")
    half.feed(events.ConnectionClosed(half.client))
    assert not p.refusals()
    [refusal] = half.refusals()
    assert refusal.status == 0 and refusal.path == "/half"
    assert "before completing the request head" in refusal.reason


def test_a_bad_request_after_a_good_one_on_the_same_connection_gets_its_own_hook():
    p = Proxy()
    p.send(b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\n\r\n")
    p.server_says(OK_RESPONSE)
    p.send(b"GET http://mail%2eqq.com/ HTTP/1.1\r\n\r\n")
    [refusal] = p.refusals()
    assert refusal.host == "mail.qq.com"


# --- the last net -------------------------------------------------------------------------------


def test_a_crash_in_the_layers_emits_the_hook_and_closes_the_client_then_reraises():
    client = connection.Client(
        peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=time.time()
    )

    def crashing(event: events.Event) -> layer.CommandGenerator[None]:
        yield commands.Log("before")
        raise AssertionError("Unexpected event: RequestData(stream_id=1, data=b'secret body')")

    guarded = protocol_errors._guarded(crashing, client)
    out: list[commands.Command] = []
    with pytest.raises(AssertionError):
        out.extend(guarded(events.Start()))
    hook, close = out[1:]
    assert isinstance(hook, ProtocolErrorHook) and hook.data.client is client
    assert hook.data.reason.startswith("mitmproxy crashed: AssertionError in test_protocol_")
    assert "secret body" not in hook.data.reason  # where, not what: it may quote a body
    assert isinstance(close, commands.CloseConnection) and close.connection is client
    with pytest.raises(AssertionError):
        out.extend(guarded(events.Start()))
    assert len(out) == 4  # once per connection: the close that follows may crash again


def test_a_connection_handler_reports_a_crash_of_its_layers(caplog):
    """The real server_event path: mitmproxy logs the crash, the hook reaches the addons."""
    import asyncio

    from mitmproxy.proxy import server

    seen: list[commands.StartHook] = []

    class Handler(server.ConnectionHandler):
        async def handle_hook(self, hook: commands.StartHook) -> None:
            seen.append(hook)

    def crashing(event: events.Event) -> layer.CommandGenerator[None]:
        raise AssertionError("Unexpected event: RequestTrailers(...)")
        yield  # a generator, as layers are

    async def main() -> None:
        opts = options.Options()
        Proxyserver().load(opts)
        handler = Handler(context.Context(Proxy().client, opts))
        handler.layer._handle_event = crashing  # type: ignore[method-assign]
        await handler.server_event(events.Start())
        await asyncio.wait_for(asyncio.gather(*handler.hook_tasks), TIMEOUT)

    TIMEOUT = 5
    asyncio.run(main())
    assert "mitmproxy has crashed!" in caplog.text
    [hook] = [h for h in seen if isinstance(h, ProtocolErrorHook)]
    assert hook.data.reason.startswith("mitmproxy crashed: AssertionError in ")


# --- install ------------------------------------------------------------------------------------


def test_install_is_idempotent_and_composes_with_the_body_gate():
    from mitmproxy.proxy.layers.http import _http1

    protocol_errors.install()
    bodygate.install()  # puts its own read_headers back, then re-installs this module
    protocol_errors.install()
    wrapper = _http1.Http1Server.read_headers
    assert wrapper.__wrapped__ is bodygate._read_headers
    assert not hasattr(wrapper.__wrapped__, "__wrapped__")


def test_install_refuses_another_mitmproxy(monkeypatch):
    monkeypatch.setattr(version, "VERSION", "12.0.0")
    with pytest.raises(RuntimeError, match=r"11\.0\.2.*12\.0\.0"):
        protocol_errors.install()


def test_the_hook_is_not_blocking_and_carries_one_argument():
    hook = protocol_errors._hook(Proxy().client, 400, "x" * 5000)
    assert hook.name == "egress_protocol_error" and not hook.blocking
    assert len(hook.args()) == 1 and len(hook.data.reason) == protocol_errors.MAX_REASON


# --- the audit row ------------------------------------------------------------------------------


class _Runtime:
    def __init__(self) -> None:
        from egress_guard.core.policy import load_policy
        from support import POLICIES

        self.policy = load_policy(POLICIES)
        self.tunnels: dict = {}
        self.rows: list = []

    def clock(self) -> float:
        return time.time()

    def record(self, row):
        self.rows.append(row)


def test_the_audit_adapter_records_a_block_row_per_refusal():
    from egress_guard.runtime.adapters.audit import Audit

    rt = _Runtime()
    audit = Audit(rt)  # type: ignore[arg-type]
    client = Proxy().client
    audit.egress_protocol_error(
        ProtocolErrorData(
            client,
            400,
            "Bad HTTP request line: b'GET http://mail%2eqq.com/a?b=1 HTTP/1.1'",
            http_version="HTTP/1.1",
            method="GET",
            scheme="http",
            host="MAIL.qq.com",
            port=80,
            path="/a?b=1",
        )
    )
    audit.egress_protocol_error(ProtocolErrorData(client, 0, "HTTP/2 protocol error: x"))
    first, second = rt.rows
    assert (first.kind, first.decision, first.reason_kind, first.status) == (
        "http",
        "block",
        "error",
        400,
    )
    assert (first.method, first.host, first.port, first.path, first.query) == (
        "GET",
        "mail.qq.com",
        80,
        "/a",
        "b=1",
    )
    assert first.client_ip == "127.0.0.1" and "Bad HTTP request line" in first.error
    assert first.request_id and first.request_id != second.request_id
    assert second.status == 0 and second.host == "" and second.error.startswith("HTTP/2")
