"""Marker matching and every decoder, without a proxy."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from documents import LEGAL_ARTICLE, NEWS, docx, multipart, odt, pdf, pptx, xlsx, zip_of
from egress_guard.core.decode import Budget, Unscannable, extract_texts, texts_of
from egress_guard.core.policy import load_policy
from egress_guard.core.scan import Marker, MarkerSet, StreamScanner, scan_body
from support import POLICIES

POLICY = load_policy(POLICIES).markers
SHIPPED = POLICY.markers


def ids(text: str, markers: MarkerSet = SHIPPED) -> set[str]:
    return {h.marker_id for h in markers.hits(markers.find(text))}


def body_ids(data: bytes, content_type: str = "", encoding: str = "") -> set[str]:
    result = scan_body(SHIPPED, data, content_type, encoding, POLICY.limits)
    assert not result.unscannable, result.unscannable
    return {h.marker_id for h in SHIPPED.hits(result.found)}


# --- normalization: every spelling of one marker -----------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "机密★10年",
        "機密★10年",  # simplified, traditional
        "机\u200b密★",
        "机\u200c密★",
        "机\u200d密★",
        "机\u2060密★",
        "机\ufeff密★",  # invisible
        "机\u00ad密★",
        "\u200b机密\u200b★",  # soft hyphen, around
    ],
)
def test_one_marker_many_spellings(text):
    assert "cn.classified.star" in ids(text)


@pytest.mark.parametrize(
    "text",
    [
        "核\u200b心\u200b商\u200b密\u200b★",
        "\u2060".join("核心商密★"),
        "核心\u00ad\u00ad商密★",
    ],
)
def test_invisible_characters_between_every_letter(text):
    assert "cn.trade.grade.star" in ids(text)


def test_anchors_keep_the_automaton_root_small():
    # Every Chinese marking is entered from 密 (or another shared character): the root of the
    # automaton has few children, so a pass costs about as much as a bare pass.
    from egress_guard.core.scan import choose_anchors, spellings

    keys = [sp for m in SHIPPED.markers for p in m.patterns for sp in spellings(p)]
    anchors = choose_anchors(keys)
    roots = {key[at] for key, at in anchors.items()}
    assert len(roots) <= 12, roots
    assert "密" in roots


@pytest.mark.parametrize("text", ["【机密】", "[机密]", "［机密］", "〔机密〕", "【機密】"])
def test_bracket_forms(text):
    assert "cn.classified.bracket" in ids(text)


@pytest.mark.parametrize("text", ["密级：机密", "密级:机密", "密级 ：机密", "密級：機密"])
def test_classification_field_forms(text):
    assert "cn.classified.field" in ids(text)


@pytest.mark.parametrize(
    "text",
    ["TOP SECRET\n", "Top Secret\n", "top secret\n", "ＴＯＰ ＳＥＣＲＥＴ\n", "T\u200bOP SECRET\n"],
)
def test_case_and_width(text):
    assert "en.top-secret.label" in ids(text)


def test_context_line_start_and_line():
    assert "en.top-secret.label" not in ids("the recipe is top secret, she said")
    assert "en.top-secret.label" in ids("memo\n  TOP SECRET - eyes only\n")
    assert "cn.trade.grade.label" in ids("目录\n核心商密★10年\n第一章")
    assert "cn.trade.grade.label" in ids("核心商密\n")
    assert "cn.trade.grade.label" not in ids("核心商密管理办法（试行）")  # a title, not a label
    assert ids("核心商密管理办法") == {"cn.trade.grade.mention"}  # an alert, not a block


def test_suppress_phrases_cancel_overlapping_matches():
    markers = MarkerSet((Marker("m", "lv", "block", ("商业秘密",)),), ("侵犯商业秘密",))
    assert ids("侵犯商业秘密的行为", markers) == set()
    assert ids("商业秘密", markers) == {"m"}


def test_benign_texts_are_not_blocked():
    for text in (NEWS, LEGAL_ARTICLE, "This email is confidential and intended only for you."):
        hits = SHIPPED.hits(SHIPPED.find(text))
        assert all(h.action != "block" for h in hits), hits


def test_stream_scanner_finds_a_marker_split_across_chunks_once():
    scanner = StreamScanner(SHIPPED)
    assert scanner.feed("前文" * 1000 + "绝") == set()
    assert scanner.feed("密★长期") != set()
    assert scanner.feed("后文") == set()


def test_verdict_overrides_and_unscannable():
    found = SHIPPED.find("核心商密★")
    plain = POLICY.verdict(found, "", "u", (), "x.example", "")
    assert plain.action == "block" and plain.rule_id == "cn.trade.grade.star"
    assert POLICY.verdict(set(), "too big", "u", (), "x", "").action == "block"
    assert POLICY.verdict(set(), "too big", "u", (), "x", "").rule_id == "scan.unscannable"
    assert POLICY.verdict(set(), "", "u", (), "x", "").action == ""


def test_override_changes_level_actions(write_policy):
    text = (
        (POLICIES / "markers.yaml")
        .read_text()
        .replace(
            "  overrides: []",
            "  overrides:\n    - id: markers.corp\n      categories: [company]\n"
            "      actions: {trade_secret: log, trade_secret_mention: log}\n"
            "      unscannable: alert",
        )
    )
    directory = write_policy({"markers.yaml": text})
    policy = load_policy(directory).markers
    found = policy.markers.find("核心商密★")
    assert policy.verdict(found, "", "u", (), "drive.corp", "company").action == "log"
    assert policy.verdict(found, "", "u", (), "x.example", "").action == "block"
    assert policy.verdict(set(), "enc", "u", (), "d", "company").action == "alert"


# --- decoders ---------------------------------------------------------------------------------


MARKED = "内容：绝密★长期".encode()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda d: zlib.compress(d)[2:-4]),  # raw deflate, as some clients send
        ("br", brotli.compress),
        ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
        ("gzip, br", lambda d: brotli.compress(gzip.compress(d))),
        ("zstd, gzip", lambda d: gzip.compress(zstandard.ZstdCompressor().compress(d))),
    ],
)
def test_content_encodings(encoding, encode):
    assert "cn.classified.star" in body_ids(encode(MARKED), "text/plain", encoding)


@pytest.mark.parametrize(
    ("charset", "declared"),
    [
        ("utf-8", True),
        ("gbk", True),
        ("gb2312", True),
        ("gb18030", False),
        ("gbk", False),
        ("big5", True),
        ("big5", False),
        ("utf-16", False),
        ("utf-16-le", False),
        ("utf-16-be", False),
    ],
)
def test_charsets(charset, declared):
    text = "附件：機密★10年" if "big5" in charset else "附件：机密★10年"
    ctype = f"text/plain; charset={charset}" if declared else "text/plain"
    assert "cn.classified.star" in body_ids(text.encode(charset), ctype)


def test_json_strings_and_escapes():
    body = json.dumps({"a": [{"b": "秘密★1年"}], "c": 1}).encode()  # ensure_ascii → \\uXXXX
    assert b"\\u" in body
    assert "cn.classified.star" in body_ids(body, "application/json")


def test_urlencoded_nested_json_value():
    from urllib.parse import urlencode

    inner = json.dumps({"html": "<p>绝密★</p>"})
    assert "cn.classified.star" in body_ids(
        urlencode({"payload": inner}).encode(), "application/x-www-form-urlencoded"
    )


def test_html_with_tags_inside_the_marker():
    html = "<html><body><p>机<b>密</b><span>★</span>10年</p></body></html>".encode()
    assert "cn.classified.star" in body_ids(html, "text/html")


def test_multipart_recursive_with_file_names():
    inner, inner_type = multipart([("x", "", "text/plain", "核心商密★".encode())], "inner-b")
    body, ctype = multipart([("meta", "", "", b"hello"), ("nested", "", inner_type, inner)])
    assert "cn.trade.grade.star" in body_ids(body, ctype)
    named, ntype = multipart([("f", "【绝密】报价.xlsx", "application/octet-stream", b"\x00\x01")])
    assert "cn.classified.bracket" in body_ids(named, ntype)


def test_base64_blocks_and_data_urls():
    payload = base64.b64encode(("x" * 60 + "机密★5年").encode()).decode()
    assert "cn.classified.star" in body_ids(f"att={payload}".encode(), "text/plain")
    urlsafe = base64.urlsafe_b64encode(docx("正文", header="机密★5年")).decode()
    assert "cn.classified.star" in body_ids(json.dumps({"d": urlsafe}).encode(), "application/json")
    data_url = "data:text/plain;base64," + base64.b64encode(("y" * 60 + "绝密★").encode()).decode()
    assert "cn.classified.star" in body_ids(f'<img src="{data_url}">'.encode(), "text/html")


@pytest.mark.parametrize(
    ("name", "document"),
    [
        ("docx body", docx("机密★5年 正文")),
        ("docx header", docx("正文", header="机密★5年")),
        ("docx footer", docx("正文", footer="机密★5年")),
        ("docx comment", docx("正文", comment="机密★5年")),
        ("xlsx", xlsx(["季度", "机密★5年"])),
        ("pptx", pptx("机密★5年")),
        ("odt header", odt("正文", header="机密★5年")),
        ("nested zip", zip_of({"a/b.zip": zip_of({"c.docx": docx("x", header="机密★5年")})})),
        ("text in zip", zip_of({"notes.txt": "机密★5年".encode("gbk")})),
    ],
)
def test_office_and_archives(name, document):
    assert "cn.classified.star" in body_ids(document, "application/octet-stream"), name


def test_pdf_text():
    assert "en.top-secret.label" in body_ids(pdf(["Plan", "TOP SECRET"]), "application/pdf")


def test_texts_of_prefers_the_declared_charset_and_sniffs_otherwise():
    assert texts_of("机密".encode("gbk"), "gbk") == ["机密"]
    assert texts_of("机密".encode()) == ["机密"]
    assert "机密" in texts_of("机密".encode("gbk"))  # undeclared, not UTF-8: every guess


# --- limits: bombs, depth, time ---------------------------------------------------------------


def test_decompression_bomb_is_unscannable_with_bounded_memory():
    bomb = gzip.compress(b"\x00" * (200 * 1024 * 1024))  # 200 MiB of zeros, ~200 KB
    with pytest.raises(Unscannable, match="expands to more than"):
        list(extract_texts(bomb, "text/plain", "gzip", Budget(max_expanded=8 * 1024 * 1024)))


def test_zip_bomb_is_unscannable():
    bomb = zip_of({f"f{i}.txt": b"\x00" * (4 * 1024 * 1024) for i in range(8)})
    with pytest.raises(Unscannable, match="expands"):
        list(extract_texts(bomb, "", "", Budget(max_expanded=16 * 1024 * 1024)))


def test_nesting_beyond_the_limit_is_unscannable():
    doc = b"secret"
    for i in range(8):
        doc = zip_of({f"level{i}.zip": doc})
    with pytest.raises(Unscannable, match="nested deeper"):
        list(extract_texts(doc, "", "", Budget(max_depth=4)))


def test_time_budget():
    with pytest.raises(Unscannable, match="took longer"):
        list(
            extract_texts(
                zip_of({f"{i}.txt": b"x" for i in range(50)}),
                "",
                "",
                Budget(max_seconds=0.0, deadline=1.0),
            )
        )


def test_broken_inputs_are_unscannable_not_crashes():
    for data, ctype, enc in [
        (b"\x1f\x8b garbage", "", ""),
        (b"not gzip", "", "gzip"),
        (b"PK\x03\x04broken", "", ""),
        (b"%PDF-1.4 broken", "", ""),
        (b"--x\r\nbroken", "multipart/form-data; boundary=y", ""),
    ]:
        result = scan_body(SHIPPED, data, ctype, enc, POLICY.limits)
        assert result.unscannable, (data, result)


def test_binary_is_not_read_as_text_and_media_is_skipped():
    import os

    noise = os.urandom(64 * 1024)
    assert texts_of(noise) == []  # neither GB18030/Big5 nor plausible UTF-16
    assert list(extract_texts(b"\x89PNG\r\n\x1a\n" + noise, "image/png")) == []
    assert "cn.classified.star" in body_ids("机密★ 文".encode("utf-16-le"), "")  # still text


@pytest.mark.parametrize("magic", [b"Rar!\x1a\x07\x01\x00", b"7z\xbc\xaf\x27\x1c\x00\x04"])
def test_archives_that_cannot_be_opened_are_unscannable(magic):
    result = scan_body(
        SHIPPED, magic + b"\x00" * 100, "application/octet-stream", "", POLICY.limits
    )
    assert "cannot be inspected" in result.unscannable


@pytest.mark.parametrize("text", ["密" * 300_000, "机密" * 150_000, "核心商密" * 100_000])
def test_text_built_from_marker_fragments_is_unscannable_not_a_stall(text):
    # Each 密 is a partial match to verify; a body of nothing else would keep the scanner
    # busy for minutes. It is cut off and gets the unscannable verdict (block by default).
    result = scan_body(SHIPPED, text.encode(), "text/plain", "", POLICY.limits)
    assert "pathological" in result.unscannable


def test_ordinary_text_with_many_markers_is_still_scanned():
    text = ("核心商密★ 季度报告，销售数据。" * 2000).encode()
    result = scan_body(SHIPPED, text, "text/plain", "", POLICY.limits)
    assert not result.unscannable and result.found


def test_a_reloaded_policy_is_never_scanned_with_the_previous_automaton():
    """Workers cache automata by the marker set's content. Keyed by ``id()``, a new marker set
    allocated where a freed one lived got the old automaton; here the old and the new set
    share an id on purpose (the same object, its markers replaced as a reload would)."""
    from egress_guard.core import scan
    from egress_guard.core.scan import ScanLimits, scan_in_worker

    old = MarkerSet((Marker("m.old", "L1", "block", ("旧标记",)),))
    new = MarkerSet((Marker("m.new", "L1", "block", ("新标记",)),))
    body = "正文 旧标记 新标记".encode()
    scan.__dict__["_WORKER_SETS"].clear()
    first = scan_in_worker(old.digest, old.markers, (), body, "", "", ScanLimits())
    assert [old.markers[i].id for i in first.found] == ["m.old"]
    second = scan_in_worker(new.digest, new.markers, (), body, "", "", ScanLimits())
    assert [new.markers[i].id for i in second.found] == ["m.new"]
    assert old.digest != new.digest
    assert MarkerSet(old.markers).digest == old.digest  # equal content, equal key


def test_a_worker_scans_a_held_body_from_its_file(tmp_path):
    from egress_guard.core.scan import ScanLimits, scan_in_worker

    held = tmp_path / "held"
    held.write_bytes("第一行\n机密★5年\n".encode())
    result = scan_in_worker(
        SHIPPED.digest, SHIPPED.markers, SHIPPED.suppress, str(held), "", "", ScanLimits()
    )
    assert result.found and not result.unscannable
