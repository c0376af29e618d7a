"""Fuzzing: the decoders and the policy loader take anything and answer with texts, a clear
"unscannable" or a PolicyError — never another exception, and within their limits."""

from __future__ import annotations

import contextlib
import gzip
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_guard.core.decode import Budget, Unscannable, extract_texts
from egress_guard.core.policy import PolicyError, load_policy
from support import POLICIES

MARKERS = load_policy(POLICIES).markers

CONTENT_TYPES = st.sampled_from(
    [
        "",
        "text/plain",
        "text/plain; charset=gbk",
        "text/plain; charset=no-such-charset",
        "application/json",
        "application/x-www-form-urlencoded",
        "text/html",
        "application/xml",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/zip",
        "application/pdf",
        "image/png",
    ]
)
ENCODINGS = st.sampled_from(["", "gzip", "deflate", "br", "zstd", "gzip, br", "identity", "x"])
PREFIXES = st.sampled_from(
    [
        b"",
        b"PK\x03\x04",
        b"%PDF-1.4\n",
        b"\x1f\x8b",
        b"--xyz\r\n",
        b'{"a": "',
        b"<html><body>",
        b"data:text/plain;base64,",
    ]
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(prefix=PREFIXES, body=st.binary(max_size=4096), ctype=CONTENT_TYPES, enc=ENCODINGS)
def test_decoders_never_crash(prefix, body, ctype, enc):
    budget = Budget(max_expanded=1 << 20, max_depth=3, max_seconds=5)
    try:
        for text in extract_texts(prefix + body, ctype, enc, budget):
            assert isinstance(text, str)
            MARKERS.markers.find(text)
    except Unscannable as e:
        assert str(e)
    assert budget.expanded <= budget.max_expanded + 4096


@FUZZ
@given(text=st.text(max_size=2000))
def test_marker_matching_takes_any_text(text):
    found = MARKERS.markers.find(text)
    assert found <= set(range(len(MARKERS.markers.markers)))


@FUZZ
@given(payload=st.binary(min_size=1, max_size=2048))
def test_compressed_garbage_is_unscannable_or_text(payload):
    for data, enc in (
        (gzip.compress(payload), "gzip"),
        (zlib.compress(payload), "deflate"),
        (payload, "gzip"),
        (payload, "br"),
        (payload, "zstd"),
    ):
        with contextlib.suppress(Unscannable):
            list(extract_texts(data, "", enc, Budget(max_expanded=1 << 20)))


YAML_PIECES = st.sampled_from(
    [
        "categories:\n",
        "  webmail:\n",
        "    action: block\n",
        "    action: maybe\n",
        "    rules:\n",
        "      - id: webmail.x\n",
        "        hosts: [mail.x.com]\n",
        "        hosts: [https://x]\n",
        "        paths: [nope]\n",
        "settings:\n",
        "  retention_months: 3\n",
        "  retention_months: 12\n",
        "uploads:\n",
        "  per_request: 1MiB\n",
        "  per_request: lots\n",
        "markers:\n",
        "  levels:\n",
        "    - id: l\n",
        "      action: block\n",
        "      markers:\n",
        "        - {id: m, patterns: [机密★]}\n",
        "  - [\n",
        ": :\n",
        "\t\n",
        "x: !!python/object:os.system\n",
        "&a [*a]\n",
    ]
)


@FUZZ
@given(pieces=st.lists(YAML_PIECES, max_size=14), raw=st.binary(max_size=200))
def test_policy_loader_answers_with_a_policy_or_a_located_error(tmp_path_factory, pieces, raw):
    d = tmp_path_factory.mktemp("fuzz-policy")
    (d / "a.yaml").write_text("".join(pieces), encoding="utf-8")
    (d / "b.yaml").write_bytes(raw)
    try:
        load_policy(d)
    except PolicyError as e:
        assert e.problems
        for problem in e.problems:
            assert problem.startswith(str(d)), problem  # names the file (and line)
