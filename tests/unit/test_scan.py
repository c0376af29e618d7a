"""Marker matching and every decoder, without a proxy."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from documents import (
    EMAIL_FOOTERS,
    FILM_LISTINGS,
    GRADE_TRAINING,
    LEGAL_ARTICLE,
    NEWS,
    TEXTBOOK,
    docx,
    multipart,
    odt,
    pdf,
    pptx,
    xlsx,
    zip_of,
)
from egress_guard.core import scan
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

    from documents import png

    noise = os.urandom(64 * 1024)
    # One reading: the UTF-8 runs inside the binary; neither GB18030/Big5 nor plausible UTF-16
    assert len(texts_of(noise)) == 1
    assert list(extract_texts(png(), "image/png")) == []  # media: bytes that parse as PNG
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


# --- trade-secret grades: labels block, running text alerts -------------------------------------
# Forms from the 国资委 rule (密级标注统一为“核心商密”“普通商密”; 标志由权属、密级、保密期限组成;
# 保密期限 以年、月、日计, or 长期 / 公布前) and company variants (一级/二级/三级商密, 商密一级,
# 商业秘密 一级, ▲ or ☆ where ★ is reserved for national secrets, "二级商密一年").

TRADE = "trade_secret"


def verdict_of(text: str):
    return POLICY.verdict(SHIPPED.find(text), "", "u", (), "x.example", "")


def blocked_levels(text: str) -> set[str]:
    return {h.level for h in verdict_of(text).hits if h.action == "block"}


@pytest.mark.parametrize(
    "text",
    [
        # first on a line (a cover, a header, a cell), then nothing or a title after a gap
        "核心商密\n",
        "核心商密 关于2026年度产品定价的通知\n",
        "一级商密 关于华东区域渠道返利的报价方案\n",
        "核心商密 二〇二六年度并购计划\n",
        "普通商密\u3000供应商名单（第三季度）\n",
        "二级商密 | 渠道返利测算表\n",
        # in brackets, alone or after a title
        "（一级商密）\n",
        "（二级商密）供应商名单\n",
        "(三级商密) 价格表\n",
        "华东区域报价单（核心商密）\n",
        # with a colon
        "普通商密：\n",
        "核心商密：2026年度预算\n",
        # with a protection period (anywhere on the line)
        "一级商密 保密期限：5年\n",
        "核心商密 保密期限：长期\n",
        "核心商密 长期\n",
        "三级商密（保密期限：3年）\n",
        "核心商密 保密期限至2030年12月31日\n",
        "中国某某集团 核心商密 5年\n第一章 总则\n",
        "二级商密一年\n",
        "核心商密▲5年 报价单\n",
        "华东区域报价单 普通商密☆3年\n",
        # the 密级 field, also as a tab-separated or run-together table row
        "密级：核心商密\n",
        "编号：HD-2026-017  密级:普通商密  页数：3\n",
        "密 级：一级商密\n",
        "密级\t二级商密\n",
        "保密等级：核心商密\n",
        # reversed company forms
        "商密 一级\n",
        "商密二级\n",
        "商业秘密 一级\n",
        "商业秘密　三级 报价单\n",
    ],
)
def test_grade_written_as_a_label_blocks(text):
    assert TRADE in blocked_levels(text), (text, verdict_of(text).hits)


@pytest.mark.parametrize(
    ("name", "body", "ctype"),
    [
        ("xlsx cell", xlsx(["项目", "一级商密", "负责人"]), "application/octet-stream"),
        ("xlsx cell with period", xlsx(["密级", "核心商密 保密期限：10年"]), ""),
        ("docx header", docx("正文" * 20, header="二级商密 保密期限：3年"), ""),
        ("docx paragraph then title", docx("普通商密\n关于供应商名单的说明", split_runs=False), ""),
        (
            "html row, cells run together",
            "<tr><td>核心商密</td><td>5年</td></tr>".encode(),
            "text/html",
        ),
        (
            "html 密级 row",
            "<table><tr><td>密级</td><td>核心商密</td></tr></table>".encode(),
            "text/html",
        ),
    ],
)
def test_grade_label_in_documents_and_cells_blocks(name, body, ctype):
    result = scan_body(SHIPPED, body, ctype, "", POLICY.limits)
    assert not result.unscannable, result.unscannable
    verdict = POLICY.verdict(result.found, "", "u", (), "x.example", "")
    assert verdict.action == "block" and verdict.level == TRADE, (name, verdict.hits)


@pytest.mark.parametrize(
    "text",
    [
        "公司将商业秘密分为核心商密和普通商密两级管理。",
        "根据公司规定，一级商密文件须加密存储，不得通过个人邮箱发送。\n",
        "培训材料：核心商密与普通商密的区别在于泄露后果的严重程度。\n",
        "核心商密管理办法（试行）\n",
        "核心商密、普通商密的确定由业务部门拟定。\n",
        "核心商密的保密期限一般不超过10年。\n",
        "核心商密长期处于严格保护之下。\n",
        "问：核心商密可以通过个人邮箱发送吗？\n",
        "所谓“核心商密”，在部分企业中称为一级商密。\n",
        "《核心商密》\n",
        "（三）普通商密的载体应当存放在保密柜中。\n",
        "**核心商密**：泄露后果特别严重\n",
        "报价单 核心商密▲\n",
    ],
)
def test_grade_inside_running_text_is_an_alert(text):
    verdict = verdict_of(text)
    assert verdict.action == "alert", (text, verdict.hits)
    assert {h.marker_id for h in verdict.hits} == {"cn.trade.grade.mention"}


def test_a_grade_being_defined_is_neither_label_nor_alert():
    assert ids("核心商密：是指泄露会使公司经济利益遭受特别严重损害的商业秘密。") == set()
    assert ids("分为核心商业秘密（核心商密）和普通商业秘密（普通商密）两级") == set()


@pytest.mark.parametrize(
    ("text", "marker"),
    [
        ("秘密☆5年\n", "cn.classified.star-variant"),
        ("会议纪要 机密*10年", "cn.classified.star-variant"),
        ("绝密⭐长期", "cn.classified.star-variant"),
        ("机密✩ 5年", "cn.classified.star-variant"),
        ("秘密☆\n", "cn.classified.star-variant"),  # a label of its own
        ("机密⭑10年", "cn.classified.star"),  # black stars are ★
        ("机密\U0001f7ca5年", "cn.classified.star"),
    ],
)
def test_star_variants_with_a_period_or_as_a_label_block(text, marker):
    assert marker in ids(text)
    assert "national_secret" in blocked_levels(text)


@pytest.mark.parametrize(
    "text",
    [
        "分享我的小秘密☆",
        "这是我们的秘密⭐",
        "**机密**\n",
        "这件事很**机密**，别外传",
        "机密*号文件",
    ],
)
def test_star_variants_as_decoration_pass(text):
    assert ids(text) == set()


def test_label_context_semantics_with_a_marker_of_its_own():
    markers = MarkerSet((Marker("g", "lv", "block", ("甲级",), "label"),))
    for label in (
        "甲级\n",
        "  甲级：x",
        "（甲级）",
        "x（甲级）y",
        "x：甲级\n",
        "x 甲级 5年",
        "甲级 标题",
    ):
        assert ids(label, markers) == {"g"}, label
    for prose in (
        "甲级标题",
        "x甲级\n",
        "“甲级”",
        "《甲级》",
        "x：甲级和乙级",
        "x 甲级 5年内",
        "甲级、乙级",
    ):
        assert ids(prose, markers) == set(), prose


# --- spellings that hid a marker: outside the BMP, compatibility forms, confusables -------------


def _interleave(text: str, filler: str) -> str:
    return filler.join(text)


@pytest.mark.parametrize(
    "filler",
    [
        "\U000e0020",  # TAG SPACE
        "\U000e0041\U000e007f",  # TAG LATIN CAPITAL LETTER A, CANCEL TAG
        "\U000e0001",  # LANGUAGE TAG
        "\U000e0100",  # VARIATION SELECTOR-17 (supplement)
        "\U000e01ef",  # VARIATION SELECTOR-256
        "\U000e0fff",  # reserved default-ignorable
        "\U0001d173",  # MUSICAL SYMBOL BEGIN BEAM
        "\U0001bca0",  # SHORTHAND FORMAT LETTER OVERLAP
        "\u180b",  # MONGOLIAN FREE VARIATION SELECTOR ONE (Mn, default-ignorable)
        "\u17b4",  # KHMER VOWEL INHERENT AQ
        "\u2065",  # reserved default-ignorable
        "\ufff0",  # reserved default-ignorable
    ],
)
def test_default_ignorable_characters_of_every_plane_are_seen_through(filler):
    assert "cn.classified.star" in ids(_interleave("机密★5年", filler))
    assert "cn.trade.grade.label" in ids(_interleave("核心商密", filler) + " 报价单\n")


@pytest.mark.parametrize(
    ("text", "marker"),
    [
        ("核\u2f3c商密★10年 报价单\n", "cn.trade.grade.star"),  # KANGXI RADICAL HEART
        ("\u2f00级商密★3年\n", "cn.trade.grade.star"),  # KANGXI RADICAL ONE
        ("\u2f06级商密 报价单\n", "cn.trade.grade.label"),  # KANGXI RADICAL TWO
        ("\u3299密★1年 会议纪要\n", "cn.classified.star"),  # CIRCLED IDEOGRAPH SECRET
        ("\u3280级商密★\n", "cn.trade.grade.star"),  # CIRCLED IDEOGRAPH ONE
        ("\U0001f229级商密★\n", "cn.trade.grade.star"),  # SQUARED CJK UNIFIED IDEOGRAPH-4E00
        ("内部资\uf9be 严禁外传", "cn.internal.label"),  # CJK COMPATIBILITY IDEOGRAPH-F9BE (料)
        ("\U0002f814部资料 注意保密", "cn.internal.label"),  # CJK COMPAT. IDEOGRAPH-2F814 (內)
        ("\u30fc级商密★\n", "cn.trade.grade.star"),  # KATAKANA PROLONGED SOUND MARK for 一
        ("\uff70级商密★\n", "cn.trade.grade.star"),  # its half-width form
        ("\ufe3b绝密\ufe3c 作战方案\n", "cn.classified.bracket"),  # vertical 【】
        ("密级\ufe55绝密\n", "cn.classified.field"),  # SMALL COLON
        ("密级\ufe13核心商密\n", "cn.trade.grade.field"),  # PRESENTATION FORM FOR VERTICAL COLON
        ("报价单 核心商密\u2ed3期\n", "cn.trade.grade.label"),  # CJK RADICAL C-SIMPLIFIED LONG
        ("报价单 核心商密 5\u2f49\n", "cn.trade.grade.label"),  # KANGXI RADICAL MOON in 5月
        ("\u3000核心商密\u200b：2026年度预算\n", "cn.trade.grade.label"),  # a hidden context
    ],
)
def test_compatibility_forms_and_look_alikes_inside_a_marker(text, marker):
    assert marker in ids(text), ids(text)


@pytest.mark.parametrize(
    "text",
    [
        "\U0001d413\U0001d40e\U0001d40f \U0001d412\U0001d404\U0001d402\U0001d411\U0001d404"
        "\U0001d413\nplan",  # mathematical bold
        "\u24c9\u24c4\u24c5 \u24c8\u24ba\u24b8\u24c7\u24ba\u24c9\nplan",  # circled, every letter
        "top se\u24d2ret\n",  # circled small c: the letter the key is entered from
        "T\u041eP S\u0415CRET\nplan",  # Cyrillic О, Е
        "top se\u0441ret\n",  # Cyrillic с for the anchor letter
        "top s\u03b5cret\n",  # Greek ε
        "TOP\u00a0SECRET\nplan",  # NO-BREAK SPACE
        "top\u2003secret\n",  # EM SPACE
        "top se\u2102ret\n",  # DOUBLE-STRUCK CAPITAL C
    ],
)
def test_latin_look_alikes_in_an_english_marker(text):
    assert "en.top-secret.label" in ids(text)


def test_english_markers_match_whole_words():
    assert ids("CONFIDENTIALITY NOTICE: This e-mail is intended only for you.\n") == set()
    assert ids("TOP SECRETARY of the club\n") == set()
    assert ids("CONFIDENTIAL\n") == {"en.confidential.label"}  # still the alert it was


def test_stream_scanner_sees_a_tag_character_kept_in_the_tail():
    scanner = StreamScanner(SHIPPED)
    assert scanner.feed("前文" * 1000 + "机\U000e0020") == set()
    assert "cn.classified.star" in {h.marker_id for h in SHIPPED.hits(scanner.feed("密★5年"))}


def test_ordinary_text_takes_one_pass(monkeypatch):
    """The detection of hiders must not send ordinary text down the slow path: quotes,
    full-width punctuation, circled digits, ℃ and emoji are not look-alikes of a marker."""

    def slow(text: str) -> str:
        raise AssertionError("slow path taken")

    monkeypatch.setattr(scan, "normalize_slow", slow)
    everyday = "“今天”气温25℃，①请按时提交周报——谢谢😀 Ｑ３ report, budget; 秘密花园。\n"
    for text in (NEWS, LEGAL_ARTICLE, TEXTBOOK, FILM_LISTINGS, GRADE_TRAINING, everyday * 50):
        SHIPPED.find(text)
        SHIPPED.find_utf8(text.encode())


# --- a generated benign corpus: real-world sentences that mention secrets in running text -------

_WHO = ("公司", "集团", "本企业", "该公司", "不少企业", "中央企业", "华东分公司")
_GRADES = ("核心商密", "普通商密", "一级商密", "二级商密", "三级商密")
_MENTIONS = (
    "{who}将商业秘密分为核心商密和普通商密两级管理。",
    "根据《中央企业商业秘密保护暂行规定》，{who}的商业秘密密级分为核心商密、普通商密两级。",
    "{who}规定，{grade}文件须加密存储，不得通过个人邮箱发送。",
    "{grade}的保密期限由{who}自行设定，可以预见时限的以年、月、日计。",
    "员工离职时应当交还载有{grade}的全部载体，{who}保密办负责核查。",
    "法院审理的这起侵犯商业秘密案中，被告窃取了{who}的{grade}——一份产品配方。",
    "记者了解到，{who}将客户名单列为{grade}，仅限销售部门知悉。",
    "{grade}和普通文件的区别在于泄露后果的严重程度，{who}对此有专门培训。",
    "{grade}、普通商密分别对应不同的审批层级，{who}保密委员会每年复核。",
    "{grade}泄露后，{who}应当在24小时内向保密办公室报告。",
    "如何区分{grade}与普通商密？{who}法务部给出三点建议。",
    "{who}保密委员会审议通过了《{grade}管理办法（试行）》。",
    "问：{grade}可以带出办公区吗？答：{who}规定不可以。",
    "所谓“{grade}”，是{who}对最重要经营信息的称呼。",
    "（二）{grade}的载体应当存放在{who}指定的保密柜中。",
    "{grade}的保密期限一般不超过10年，{who}可以申请延长。",
    "他说，这是{who}的{grade}，不能告诉你。",
    "二级审批后，{grade}文件方可复印，{who}留存登记。",
)
_PROSE = (
    "{who}的商业秘密保护工作实行统一领导、分级管理的原则。",
    "该案涉及的技术信息被认定为商业秘密，{who}一审获赔经济损失五百万元。",
    "这份报告不涉及机密信息，{who}可以对外公开。",
    "信息安全的三个基本目标是机密性、完整性和可用性，{who}的培训从机密性讲起。",
    "电影《绝密使命》讲述了交通员护送机密文件的故事，{who}组织员工观影。",
    "《秘密访客》上映首周票房过亿，{who}包场观影。",
    "商业秘密是指不为公众所知悉、具有商业价值并经权利人采取相应保密措施的技术信息。",
    "本邮件可能包含机密信息，仅供指定收件人使用，{who}保留一切权利。",
    "科学家们正在揭开深海生物发光的秘密，{who}资助了这项研究。",
    "侵犯商业秘密罪的立案标准是给权利人造成损失数额在三十万元以上。",
    "{who}提醒：绝密档案首次公开展出，展期至月底。",
    "The memo was marked confidential, and {who} later published it.",
)


def _benign_corpus() -> list[tuple[str, bool]]:
    """(sentence, names a grade) for every template, company and grade: a few hundred."""
    out = [(t.format(who=w, grade=g), True) for t in _MENTIONS for w in _WHO for g in _GRADES]
    out += [(t.format(who=w), False) for t in _PROSE for w in _WHO]
    return sorted(set(out))


def test_generated_benign_corpus_never_blocks():
    corpus = _benign_corpus()
    assert len(corpus) > 300
    alerts = {m.id for m in SHIPPED.markers if m.action == "alert"}
    for sentence, names_a_grade in corpus:
        for text in (sentence, sentence + "\n", "前文。\n" + sentence):
            hits = SHIPPED.hits(SHIPPED.find(text))
            assert {h.marker_id for h in hits} <= alerts, (text, hits)
            # a grade in running text is the mention alert the policy asks for, nothing else
            assert bool(hits) == names_a_grade, (text, hits)
    document = "\n".join(s for s, _ in corpus)
    assert verdict_of(document).action == "alert"
    body = docx(document, split_runs=False)
    result = scan_body(SHIPPED, body, "application/octet-stream", "", POLICY.limits)
    assert POLICY.verdict(result.found, "", "u", (), "x", "").action == "alert"


@pytest.mark.parametrize(
    "text", [NEWS, TEXTBOOK, FILM_LISTINGS, *EMAIL_FOOTERS], ids=lambda t: t[:12]
)
def test_benign_documents_pass_without_alert(text):
    assert ids(text) == set(), ids(text)


def test_legal_and_training_texts_alert_at_most():
    for text in (LEGAL_ARTICLE, GRADE_TRAINING):
        assert verdict_of(text).action == "alert"
        assert {h.marker_id for h in verdict_of(text).hits} == {"cn.trade.grade.mention"}
