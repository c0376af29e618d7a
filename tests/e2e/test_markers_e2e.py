"""Secret-marker scanning through the real gateway: every way a marked document can be sent,
refused before the upstream gets it; benign texts pass."""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
from urllib.parse import urlencode

import pytest

from documents import LEGAL_ARTICLE, NEWS, docx, multipart, pdf
from egress_guard.core.decode import Budget
from harness import GatewayProcess, curl, ws_session
from support import policy_copy

pytestmark = pytest.mark.slow
MiB = 1024 * 1024

UPLOADS = "uploads:\n  per_request: 64MiB\n  per_user: 1GiB\n  hold_in_memory: 256KiB\n"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream):
    base = tmp_path_factory.mktemp("gw-markers")
    policies = policy_copy(base, {"uploads.yaml": UPLOADS})
    g = GatewayProcess(base / "data", policies, upstream.ca_path).start()
    yield g
    g.stop()
    assert "Traceback" not in g.text(), g.text()


def post(gw, upstream, path, body, content_type, *, encoding=None, scheme="https"):
    port = upstream.https_port if scheme == "https" else upstream.http_port
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    return curl(
        f"{scheme}://127.0.0.1:{port}{path}",
        gw.proxy,
        gw.ca_pem(),
        method="POST",
        data=body,
        headers=headers,
    )


def assert_refused(gw, upstream, reply, path, marker_id, level):
    assert reply.status == 403, (reply.status, reply.body[:300])
    page = reply.body.decode()
    assert marker_id in page and level in page
    assert "已阻止外发" in page and "Upload blocked: confidential content" in page
    rows = gw.wait_rows(lambda rs: any(r["path"] == path for r in rs), "--decision", "block")
    (row,) = [r for r in rows if r["path"] == path]
    # Held until its verdict: the upstream never heard of the request, not even its headers.
    assert upstream.find(path) is None and row["forwarded_bytes"] == 0
    assert (row["reason_kind"], row["rule_id"]) == ("marker", marker_id)
    assert level in row["marker_levels"] and marker_id in row["marker_ids"]
    return row


def test_gzip_compressed_json_post(gw, upstream):
    body = gzip.compress(
        json.dumps(
            {"subject": "季度报告", "text": "绝密★10年 附件如下"}, ensure_ascii=False
        ).encode()
    )
    reply = post(gw, upstream, "/m/gzip-json", body, "application/json", encoding="gzip")
    row = assert_refused(
        gw, upstream, reply, "/m/gzip-json", "cn.classified.star", "national_secret"
    )
    assert "绝密" not in json.dumps(row, ensure_ascii=False)  # the log never holds the text


def test_multipart_docx_with_the_marker_in_its_header(gw, upstream):
    document = docx("二〇二六年度经营计划正文", header="机密★5年")
    body, ctype = multipart(
        [
            ("note", "", "", "请查收".encode()),
            (
                "file",
                "plan.docx",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                document,
            ),
        ]
    )
    reply = post(gw, upstream, "/m/multipart-docx", body, ctype)
    assert_refused(
        gw, upstream, reply, "/m/multipart-docx", "cn.classified.star", "national_secret"
    )


def test_base64_attachment_in_a_webmail_json_api(gw, upstream):
    attachment = base64.b64encode(docx("合同草案", header="核心商密★")).decode()
    body = json.dumps(
        {
            "to": ["someone@example.org"],
            "subject": "fyi",
            "attachments": [{"name": "draft.docx", "data": attachment}],
        }
    ).encode()
    reply = post(gw, upstream, "/m/b64-json", body, "application/json")
    assert_refused(gw, upstream, reply, "/m/b64-json", "cn.trade.grade.star", "trade_secret")


def test_gbk_encoded_form(gw, upstream):
    body = urlencode({"content": "【机密】采购价格表"}, encoding="gbk").encode()
    reply = post(
        gw,
        upstream,
        "/m/gbk-form",
        body,
        "application/x-www-form-urlencoded; charset=GBK",
        scheme="http",
    )
    assert_refused(gw, upstream, reply, "/m/gbk-form", "cn.classified.bracket", "national_secret")


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/m/zwsp", "机\u200b密\u200d★10年 内部讨论稿"),
        ("/m/soft-hyphen", "绝\u00ad密★"),
        ("/m/traditional", "本文件為機密★5年，請勿外傳"),
        ("/m/fullwidth", "ＴＯＰ　ＳＥＣＲＥＴ//ＮＯＦＯＲＮ"),
    ],
)
def test_hidden_and_variant_spellings(gw, upstream, path, text):
    reply = post(gw, upstream, path, text.encode(), "text/plain; charset=utf-8")
    assert reply.status == 403
    assert upstream.find(path, wait=0.2) is None


def test_pdf_upload(gw, upstream):
    reply = post(gw, upstream, "/m/pdf", pdf(["Board memo", "TOP SECRET"]), "application/pdf")
    assert_refused(gw, upstream, reply, "/m/pdf", "en.top-secret.label", "english_classified")


def test_websocket_message_with_a_marker(gw, ws_upstream):
    before = list(ws_upstream.received)
    echoes, code = ws_session(gw.proxy_port, ws_upstream.port, [100, 200])
    assert echoes == ["got 100", "got 200"] and code is None
    # ws_session sends b"x" * size; send a marked message through a fresh session
    from harness import ws_send_texts

    echoes, code = ws_send_texts(gw.proxy_port, ws_upstream.port, ["hello", "秘密★1年 会议纪要"])
    assert echoes == ["got 5"] and code == 1008  # policy violation
    assert ws_upstream.received[len(before) + 2 :] == [5]


def test_large_held_body_with_the_marker_near_its_end(gw, upstream):
    # Over hold_in_memory: held in a private file, not in memory, until the whole body has been
    # decoded and scanned; refused, the upstream never hears of it.
    filler = ("季度销售数据汇总，" * 200_000).encode()  # ~5.4 MB of innocent text
    body = filler + "\n附：绝密★长期\n".encode()
    reply = post(gw, upstream, "/m/large-end", body, "text/plain; charset=utf-8")
    assert_refused(gw, upstream, reply, "/m/large-end", "cn.classified.star", "national_secret")
    assert upstream.find("/m/large-end") is None


def test_large_zip_inside_multipart_is_decoded_at_the_end(gw, upstream):
    noise = os.urandom(2 * MiB)  # incompressible: the marker is only in the docx header
    document = docx("正文", header="秘密★1年")
    from documents import zip_of

    archive = zip_of({"data.bin": noise, "docs/report.docx": document})
    body, ctype = multipart([("file", "bundle.zip", "application/zip", archive)])
    reply = post(gw, upstream, "/m/large-zip", body, ctype)
    assert_refused(gw, upstream, reply, "/m/large-zip", "cn.classified.star", "national_secret")


def test_encrypted_archive_is_unscannable_and_blocked(gw, upstream):
    from documents import zip_of

    archive = bytearray(zip_of({"secret.txt": "x" * 100}))
    archive[6] |= 0x1  # the "encrypted" flag in the local header...
    cd = archive.find(b"PK\x01\x02")
    archive[cd + 8] |= 0x1  # ...and in the central directory
    reply = post(gw, upstream, "/m/encrypted", bytes(archive), "application/zip")
    assert reply.status == 403
    assert "could not be fully checked" in reply.body.decode()
    rows = gw.wait_rows(lambda rs: any(r["path"] == "/m/encrypted" for r in rs))
    (row,) = [r for r in rows if r["path"] == "/m/encrypted"]
    assert row["rule_id"] == "scan.unscannable" and "encrypted" in row["error"]


@pytest.mark.parametrize(("path", "text"), [("/m/news", NEWS), ("/m/legal", LEGAL_ARTICLE)])
def test_benign_texts_pass(gw, upstream, path, text):
    body = urlencode({"title": "转发", "content": text}).encode()
    reply = post(gw, upstream, path, body, "application/x-www-form-urlencoded")
    assert reply.status == 200
    seen = upstream.find(path)
    assert seen is not None and seen.complete
    rows = gw.wait_rows(lambda rs: any(r["path"] == path for r in rs))
    (row,) = [r for r in rows if r["path"] == path]
    assert row["decision"] in ("allow", "alert")  # at most an alert


def test_metrics_count_matches_per_level(gw):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'egress_guard_marker_matches_total{category="",level="national_secret"}' in text
    assert 'egress_guard_scan_verdicts_total{verdict="block"}' in text


def peak_rss_mib(pid: int) -> float:
    """The largest peak RSS (VmHWM) of the gateway and its children: the scan pool's
    workers decode large bodies, so a bomb would show there."""
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    peaks = []
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                peaks += [int(line.split()[1]) for line in f if line.startswith("VmHWM:")]
        except FileNotFoundError:
            continue
    return max(peaks) / 1024


@functools.cache
def bomb_bodies() -> dict[str, tuple[bytes, str, str | None]]:
    from documents import zip_of

    nested = b"\xe7\xbb\x9d\xe5\xaf\x86\xe2\x98\x85"  # 绝密★, at the bottom
    for i in range(12):
        nested = zip_of({f"level{i}.zip": nested})
    return {
        # 1 GiB of zeros in about 1 MB: the decoder's budget stops it, nothing is inflated.
        "gzip": (gzip.compress(bytes(1 << 30), 1), "text/plain", "gzip"),
        # 16 files of 64 MiB each, compressed to a few hundred KB.
        "zip": (zip_of({f"f{i}.txt": bytes(64 * MiB) for i in range(16)}), "application/zip", None),
        "nested": (nested, "application/zip", None),
    }


@pytest.mark.parametrize("kind", ["gzip", "zip", "nested"])
def test_bombs_and_deep_nesting_are_refused_as_unscannable_in_bounded_memory(gw, upstream, kind):
    body, ctype, encoding = bomb_bodies()[kind]
    before = peak_rss_mib(gw.proc.pid)
    path = f"/m/bomb-{kind}"
    reply = post(gw, upstream, path, body, ctype, encoding=encoding)
    assert reply.status == 403, (reply.status, reply.body[:300])
    assert "could not be fully checked" in reply.body.decode()
    seen = upstream.find(path, wait=0.5)
    assert seen is None or not seen.complete
    rows = gw.wait_rows(lambda rs: any(r["path"] == path for r in rs))
    (row,) = [r for r in rows if r["path"] == path]
    assert row["rule_id"] == "scan.unscannable" and row["decision"] == "block"
    # Never inflated: at most the decode budget (64 MiB) held once more while it is read,
    # against the 1 GiB the bombs expand to.
    bound = 2 * Budget().max_expanded / MiB + 32
    assert peak_rss_mib(gw.proc.pid) - before < bound
    assert curl(f"http://127.0.0.1:{upstream.http_port}/after-bomb", gw.proxy).status == 200
