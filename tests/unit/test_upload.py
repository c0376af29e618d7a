"""Upload caps without a proxy: sizes, limits, the window with an injectable clock, the gate,
and the Uploads addon on mitmproxy's test flows."""

import pytest
from mitmproxy.test import tflow, tutils

from egress_guard.core.policy import PolicyError, load_policy
from egress_guard.core.units import parse_size
from egress_guard.core.upload import Limits, UploadGate, UploadWindows, check, limits_for
from egress_guard.runtime.adapters.blocklist import Blocklist
from egress_guard.runtime.adapters.identity import Identity
from egress_guard.runtime.adapters.uploads import Uploads
from egress_guard.runtime.bodygate import declared_length
from support import FakeRuntime

MiB = 1024 * 1024

POLICY = """\
categories:
  company:
    action: allow
    rules:
      - {id: company.drive, hosts: [drive.corp.example]}
uploads:
  per_request: 10MiB
  per_user: 20MiB
  window: 24h
  hold_in_memory: 1MiB
  overrides:
    - {id: uploads.company, categories: [company], per_request: unlimited, per_user: unlimited}
    - {id: uploads.design, groups: [design], per_request: 100MiB}
    - {id: uploads.boss, users: [boss], per_user: 1GB}
    - {id: uploads.design-again, groups: [design], per_request: 1KiB, per_user: 5MiB}
settings:
  identities:
    - {cidr: 10.0.0.0/8, user: someone}
    - {cidr: 10.9.0.0/16, user: designer, groups: [design]}
"""


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("10MiB", 10 * MiB),
        ("1GB", 10**9),
        ("512k", 512 * 1024),
        ("1048576", MiB),
        ("1.5GiB", 3 * 512 * MiB),
    ],
)
def test_sizes(text, n):
    assert parse_size(text) == n


def test_limits_first_matching_override_wins_per_limit(write_policy):
    rules = load_policy(write_policy({"p.yaml": POLICY})).uploads
    default = limits_for(rules, "alice", (), "www.example.org", "")
    assert (default.per_request, default.per_user, default.per_request_id) == (
        10 * MiB,
        20 * MiB,
        "uploads.per_request",
    )
    company = limits_for(rules, "alice", (), "drive.corp.example", "company")
    assert (company.per_request, company.per_user) == (None, None)
    design = limits_for(rules, "designer", ("design",), "www.example.org", "")
    # per_request from the first design override; per_user from the later one (the first
    # one does not set it).
    assert (design.per_request, design.per_request_id) == (100 * MiB, "uploads.design")
    assert (design.per_user, design.per_user_id) == (5 * MiB, "uploads.design-again")
    boss = limits_for(rules, "boss", (), "www.example.org", "")
    assert (boss.per_request, boss.per_user) == (10 * MiB, 10**9)


def test_check_reports_which_cap():
    limits = Limits(10, 100, 3600, "r", "u")
    assert check(limits, 10, 90) is None
    assert check(limits, 11, 0).kind == "per_request"
    hit = check(limits, 10, 91)
    assert (hit.kind, hit.cap_id, hit.used) == ("per_user", "u", 91)
    assert check(Limits(None, None, 1, "r", "u"), 10**12, 10**12) is None


def test_window_frees_exactly_after_its_length():
    clock = Clock()
    w = UploadWindows(3600, clock)
    w.add("alice", 100)
    clock.t += 1800
    w.add("alice", 50)
    assert w.used("alice") == 150 and w.used("bob") == 0
    clock.t += 1799
    assert w.used("alice") == 150
    clock.t += 1
    assert w.used("alice") == 50  # the first upload left the window, to the second
    clock.t += 1800
    assert w.used("alice") == 0 and w.users() == 0  # nothing kept for idle users


def test_window_adds_what_other_nodes_counted():
    w = UploadWindows(3600, Clock())
    w.remote = {"alice": 70}
    w.add("alice", 30)
    assert w.used("alice") == 100


def test_gate_counts_streamed_bytes_and_refuses_when_crossing():
    clock = Clock()
    windows = UploadWindows(3600, clock)
    windows.add("alice", 50)  # earlier uploads
    gate = UploadGate(Limits(1000, 200, 3600, "r", "u"), windows, "alice")
    assert gate.feed(b"x" * 100) is None
    assert windows.used("alice") == 150
    hit = gate.feed(b"x" * 51)  # 50 + 151 > 200
    assert hit is not None and hit.kind == "per_user" and hit.used == 50
    assert gate.seen == 100 and windows.used("alice") == 150  # the refused chunk never counted


def test_gate_does_not_count_announced_bytes_twice():
    windows = UploadWindows(3600, Clock())
    windows.add("bob", 300)  # reserved at the headers for a 300-byte body
    gate = UploadGate(Limits(1000, 400, 3600, "r", "u"), windows, "bob", reserved=300)
    assert gate.feed(b"x" * 300) is None
    assert windows.used("bob") == 300
    assert gate.feed(b"x" * 50) is None  # more than announced: now it counts
    assert windows.used("bob") == 350


@pytest.mark.parametrize(
    ("version", "method", "headers", "expected"),
    [
        ("HTTP/1.1", "POST", {"content-length": "10"}, 10),
        ("HTTP/1.1", "POST", {"transfer-encoding": "chunked"}, None),
        ("HTTP/1.1", "GET", {}, 0),
        ("HTTP/2.0", "POST", {}, None),
        ("HTTP/2.0", "GET", {}, 0),
        ("HTTP/1.1", "POST", {"content-length": "x"}, None),
    ],
)
def test_declared_length(version, method, headers, expected):
    req = tutils.treq(http_version=version.encode(), method=method.encode(), content=b"")
    req.headers.clear()
    req.headers.update(headers)
    assert declared_length(req) == expected


def test_conflicting_content_lengths_are_unknown():
    req = tutils.treq(method=b"POST", content=b"")
    req.headers.clear()
    req.headers.add("content-length", "5")
    req.headers.add("content-length", "500000")
    assert declared_length(req) is None


class TickingRuntime(FakeRuntime):
    """The adapters' runtime with the test's clock."""

    def __init__(self, spill_dir, policy_dir, clock):
        super().__init__(spill_dir, policy_dir)
        self.windows.clock = self.clock = clock


@pytest.fixture
def addons(write_policy, tmp_path):
    clock = Clock()
    rt = TickingRuntime(tmp_path / "held", write_policy({"p.yaml": POLICY}), clock)
    return clock, rt, [Identity(rt), Blocklist(rt), Uploads(rt)]


def upload(addons_, size, client_ip="10.1.2.3", host="upload.example.org"):
    flow = tflow.tflow()
    flow.client_conn.peername = (client_ip, 50000)
    flow.request.method = "POST"
    flow.request.host = host
    flow.request.headers["content-length"] = str(size)
    for addon in addons_:
        addon.requestheaders(flow)
    return flow


def test_uploads_addon_refuses_the_nth_upload_and_frees_after_the_window(addons):
    clock, _gw, chain = addons
    for _ in range(2):
        assert upload(chain, 8 * MiB).response is None  # 16 MiB of 20
    clock.t += 3600
    refused = upload(chain, 8 * MiB)
    assert refused.response.status_code == 413
    assert b"uploads.per_user" in refused.response.content
    clock.t += 20 * 3600
    assert upload(chain, 8 * MiB).response is not None  # 24 h not over yet for the first two
    clock.t += 3 * 3600 + 1
    assert upload(chain, 8 * MiB).response is None  # the window has freed up
    assert upload(chain, 11 * MiB).response.status_code == 413  # per request, regardless


def test_uploads_addon_holds_every_body_it_counts(addons):
    """Announced or not, small or large: a body is counted as it arrives and held by the body
    gate until its verdict (``stream`` routes it there)."""
    _clock, _gw, chain = addons
    assert upload(chain, 100_000).request.stream
    assert upload(chain, 2 * MiB).request.stream
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.headers["transfer-encoding"] = "chunked"
    for addon in chain:
        addon.requestheaders(flow)
    assert flow.request.stream and flow.response is None


def test_uploads_to_company_services_are_unlimited_and_uncounted(addons):
    _clock, gw, chain = addons
    flow = upload(chain, 500 * MiB, host="drive.corp.example")
    assert flow.response is None
    assert gw.windows.used("someone") == 0


def test_policy_errors_in_uploads_name_file_line_and_field(write_policy):
    bad = POLICY.replace("per_user: 20MiB", "per_user: 20 apples").replace(
        "{id: uploads.boss, users: [boss], per_user: 1GB}", "{id: uploads.boss, per_user: 1GB}"
    )
    with pytest.raises(PolicyError) as err:
        load_policy(write_policy({"p.yaml": bad}))
    problems = "\n".join(err.value.problems)
    assert "p.yaml:8: uploads.per_user: '20 apples' is not a size" in problems, problems
    assert "p.yaml:14: uploads.overrides[2]: an override needs" in problems, problems
