"""Property tests for the scanner, in process: what the decoders can undo, stacked at random,
never hides a marker; the marker words in ordinary prose never block.

(a) A blocking marker inside benign text (empty, too: short base64), under a random stack of up
    to three layers of what ``core.decode`` supports: gzip (labelled, or found by its magic
    bytes), deflate (labelled: nothing else says it is deflate), base64 (one line, or MIME
    lines), base64 or a string inside JSON, a url-encoded form field, a multipart part, a zip
    member, a .docx, and the text in UTF-8, GBK, GB18030, Big5 or UTF-16, declared or not. A
    form or multipart body inside base64, a zip member or unlabelled gzip loses its
    Content-Type, as on the wire. ``scan_body`` must find that marker, or call the body
    unscannable (which blocks by policy): never a silent pass.
(b) The marker words (商业秘密, 机密性, 秘密, 绝密, 机密) inside ordinary sentences, not in a
    marking form, alone or under the same stacks: no block (and not unscannable, which would
    block them too).

Failure classes the properties found while this was written are pinned by deterministic tests
(``CLASSES``); the ones still failing are listed in ``KNOWN_FAILURES``: strict xfails, and
skipped by the properties (``assume``) until a fix takes them off the list.

Left out of the strategies, on purpose:
- hex and base32 encodings, and a marker split across two requests: stated limits (the
  README's "What is scanned" names neither encoding; each request is judged on its own);
- a form or multipart field holding raw UTF-16 (servers decode a form in its page charset; such
  bytes go base64 here).
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from documents import NEWS, docx, multipart, zip_commented, zip_of
from egress_guard.core.policy import load_policy
from egress_guard.core.scan import scan_body
from support import POLICIES

POLICY = load_policy(POLICIES).markers
SHIPPED = POLICY.markers

# Blocking markers whose context is "any" (they block wherever they stand), as
# (text, traditional spelling for Big5, marker id).
MARKERS = [
    ("机密★5年", "機密★5年", "cn.classified.star"),
    ("绝密★长期", "絕密★長期", "cn.classified.star"),
    ("秘密★1年", "秘密★1年", "cn.classified.star"),
    ("【绝密】", "【絕密】", "cn.classified.bracket"),
    ("密级：机密", "密級：機密", "cn.classified.field"),
    ("核心商密★", "核心商密★", "cn.trade.grade.star"),
    ("【一级商密】", "【一級商密】", "cn.trade.grade.bracket"),
]
WORDS = [
    "季度报告",
    "销售数据",
    "会议纪要",
    "项目进展",
    "请各部门参阅",
    "天气晴",
    "预算执行情况",
    "客户回访",
    "下周一上午十点",
    "华东区域",
    "quarterly review",
    "see attachment",
]
TRADITIONAL = {  # for Big5, which has no simplified forms
    "季度报告": "季度報告",
    "销售数据": "銷售數據",
    "会议纪要": "會議紀要",
    "项目进展": "項目進展",
    "请各部门参阅": "請各部門參閱",
    "天气晴": "天氣晴",
    "预算执行情况": "預算執行情況",
    "客户回访": "客戶回訪",
    "下周一上午十点": "下週一上午十點",
    "华东区域": "華東區域",
}
CHARSETS = ["utf-8", "gbk", "gb18030", "big5", "utf-16", "utf-16-le"]
LAYERS = ["gzip", "deflate", "base64", "json", "form", "multipart", "zip"]
CE = ("gzip", "deflate")  # what a Content-Encoding label can say

# --- building the bodies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str = ""
    encoding: str = ""  # Content-Encoding
    text: bool = True  # the bytes are text a form or JSON string can carry as it is

    def describe(self) -> str:
        return f"{self.content_type!r} {self.encoding!r} {len(self.data)} B"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def base_body(text: str, charset: str, declared: bool, as_docx: bool) -> Body:
    if as_docx:
        return Body(docx(text), "application/octet-stream", text=False)
    data = text.encode(charset)
    utf16 = charset.startswith("utf-16")
    if charset == "utf-16-le":
        declared = True  # without a BOM nobody can tell: a sender declares it
    ctype = f"text/plain; charset={charset}" if declared else ""
    return Body(data, ctype, text=not utf16)


def wrap(body: Body, layer: str, label: bool) -> Body:
    """One layer around ``body``. ``label``: gzip/deflate say so in Content-Encoding (only the
    outermost run of them can); any base64 the others write is MIME-wrapped (76 columns)."""
    if layer in CE:
        data = gzip.compress(body.data, mtime=0) if layer == "gzip" else zlib.compress(body.data)
        if label:
            encoding = f"{body.encoding}, {layer}" if body.encoding else layer
            return Body(data, body.content_type, encoding, text=False)
        return Body(data, "", text=False)  # gzip found by its magic bytes
    assert not body.encoding, "a Content-Encoding stays outermost"
    utf8 = body.text and _is_utf8(body.data)
    encoded = base64.encodebytes(body.data).decode() if label else _b64(body.data)
    if layer == "base64":
        return Body(encoded.encode(), "text/plain")
    if layer == "json":
        value = body.data.decode() if utf8 else encoded
        return Body(json.dumps({"memo": value, "n": 1}).encode(), "application/json")
    if layer == "form":
        value = quote(body.data) if body.text else quote(encoded)
        return Body(f"a=1&memo={value}&b=2".encode(), "application/x-www-form-urlencoded")
    if layer == "multipart":
        name = "notes.txt" if body.text else "blob.bin"
        boundary = f"eg-{zlib.crc32(body.data):08x}"  # never the boundary of an inner part
        data, ctype = multipart(
            [("meta", "", "", b"hello"), ("file", name, body.content_type, body.data)], boundary
        )
        return Body(data, ctype, text=False)
    if layer == "zip":
        # the member's charset label is lost: text is sniffed, UTF-16 keeps its BOM or is
        # plausible CJK
        return Body(zip_of({"notes.txt" if body.text else "blob.bin": body.data}), "", text=False)
    raise AssertionError(layer)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@st.composite
def layer_stacks(draw: st.DrawFn) -> list[tuple[str, bool]]:
    """Up to three layers, innermost first; deflate only where a Content-Encoding label can say
    it (the outermost run of gzip/deflate), gzip labelled there or found by magic. The label
    of other layers says how base64 is written: True, MIME-wrapped in 76-character lines. A
    form or multipart body inside base64, a zip member or unlabelled gzip loses its
    Content-Type, as it would on the wire."""
    layers = draw(st.lists(st.sampled_from(LAYERS), max_size=3))
    run = len(layers)  # where the outermost run of gzip/deflate starts
    while run and layers[run - 1] in CE:
        run -= 1
    layers = [
        ("gzip" if layer == "deflate" and i < run else layer) for i, layer in enumerate(layers)
    ]
    # that run is labelled as a whole (a Content-Encoding lists them all), or, gzip only, not
    labelled = "deflate" in layers[run:] or draw(st.booleans())
    return [
        (layer, (i >= run and labelled) if layer in CE else draw(st.booleans()))
        for i, layer in enumerate(layers)
    ]


def lost_label_stacks(kind: str) -> st.SearchStrategy[list[tuple[str, bool]]]:
    """``kind`` (form or multipart) inside one layer that drops its Content-Type."""
    return st.sampled_from(["base64", "zip", "gzip"]).map(
        lambda outer: [(kind, False), (outer, False)]
    )


def build(text: str, charset: str, declared: bool, as_docx: bool, stack) -> Body:
    return build_classified(text, charset, declared, as_docx, stack)[0]


# Failure classes the properties found while this file was written (name: what fails), each
# pinned by deterministic tests further down. A class in KNOWN_FAILURES fails today: its tests
# are strict xfails (reason: its text here) and the properties skip its examples (``assume``).
# When a fix lands, take it out: its tests turn into regression tests, the properties cover it.
SHORT_BASE64_OF_ENCODED = "short-base64-of-encoded-bytes"
BASE64_ZIP_IN_UNLABELLED_FORM = "base64-zip-in-unlabelled-form"
MIME_BASE64_IN_JSON_IN_UNLABELLED_FORM = "mime-base64-in-json-in-unlabelled-form"
TEXT_FORM_WITHOUT_LABEL = "text-form-without-label"
MULTIPART_WITHOUT_LABEL = "multipart-without-label"
MIME_LINES_OF_A_ZIP = "mime-lines-of-a-zip"
CLASSES = {
    SHORT_BASE64_OF_ENCODED: "base64 under 64 characters decoded only when it holds UTF-8/GBK "
    "text: a short base64 of gzip, UTF-16, Big5 or base64 again passes unread",
    BASE64_ZIP_IN_UNLABELLED_FORM: "a url-encoded form whose Content-Type is lost (in base64, a "
    "zip member, unlabelled gzip) with a base64 zip value: the percent-escaped '+' cuts the "
    "base64, a run that starts the zip is a 'broken zip', unscannable: a false block",
    MIME_BASE64_IN_JSON_IN_UNLABELLED_FORM: "MIME-wrapped base64 in a JSON string in a form "
    "whose Content-Type is lost: the JSON is not parsed, its \\n escapes cut the base64 into "
    "lines read alone: the marker is missed, a benign zip is a false 'broken zip' block",
    TEXT_FORM_WITHOUT_LABEL: "a url-encoded form whose Content-Type is lost is read as plain "
    "text: its %-escapes are never decoded",
    MULTIPART_WITHOUT_LABEL: "a multipart body whose Content-Type is lost is read as text: a "
    "binary part (a .docx) in it is never opened",
    MIME_LINES_OF_A_ZIP: "each 76-character line of MIME-wrapped base64 is decoded alone: the "
    "first line of a zip is a 'broken zip', unscannable: a false block",
}
KNOWN_FAILURES: set[str] = set()  # none at the last run: every class above was fixed


def known(failure_class: str) -> list[pytest.MarkDecorator]:
    """The strict xfail of a class while it is a known failure."""
    if failure_class not in KNOWN_FAILURES:
        return []
    return [pytest.mark.xfail(strict=True, reason=CLASSES[failure_class])]


def xfail_if_known(failure_class: str):
    def decorate(test):
        for mark in known(failure_class):
            test = mark(test)
        return test

    return decorate


def _keeps_label(stack: list[tuple[str, bool]], i: int) -> bool:
    """Whether the Content-Type of layer ``i`` survives the layers around it: a multipart part
    carries its part's type, a labelled Content-Encoding keeps it; base64, a JSON string, a
    form value, a zip member and gzip found by its magic keep none."""
    return all(layer == "multipart" or (layer in CE and label) for layer, label in stack[i + 1 :])


def build_classified(
    text: str, charset: str, declared: bool, as_docx: bool, stack
) -> tuple[Body, set[str]]:
    """The body, and the known failure classes it falls in."""
    body = base_body(text, charset, declared, as_docx)
    plain = not as_docx and charset in ("utf-8", "gbk", "gb18030")
    classes: set[str] = set()
    for i, (layer, label) in enumerate(stack):
        utf8 = body.text and _is_utf8(body.data)
        writes_base64 = layer == "base64" or (layer == "json" and not utf8)
        writes_base64 |= layer == "form" and not body.text
        encoded = i > 0 or not plain  # what goes into base64 is not UTF-8/GBK text
        if writes_base64 and encoded and len(_b64(body.data)) < 64:
            classes.add(SHORT_BASE64_OF_ENCODED)
        unlabelled = not _keeps_label(stack, i)
        if layer == "form" and unlabelled:
            classes.add(TEXT_FORM_WITHOUT_LABEL)
            if i > 0 or not body.text:  # the value is base64 (of a zip, maybe)
                classes.add(BASE64_ZIP_IN_UNLABELLED_FORM)
        if layer == "multipart" and unlabelled and not body.text:
            classes.add(MULTIPART_WITHOUT_LABEL)
        if label and not body.text and layer in ("base64", "json", "form"):
            classes.add(MIME_LINES_OF_A_ZIP)  # MIME-wrapped base64 of binary
        in_form = [layer for layer, _ in stack[i + 1 : i + 2]] == ["form"]
        if layer == "json" and label and not utf8 and in_form and not _keeps_label(stack, i + 1):
            classes.add(MIME_BASE64_IN_JSON_IN_UNLABELLED_FORM)
        body = wrap(body, layer, label)
    return body, classes


sentences = st.lists(st.sampled_from(WORDS), max_size=10).map("，".join)  # short base64 too


def scan(body: Body):
    return scan_body(SHIPPED, body.data, body.content_type, body.encoding, POLICY.limits)


# --- (a) a marker under any stack is found or the body is unscannable -----------------------------


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    marker=st.sampled_from(MARKERS),
    before=sentences,
    after=sentences,
    charset=st.sampled_from(CHARSETS),
    declared=st.booleans(),
    as_docx=st.booleans(),
    stack=layer_stacks(),
)
def test_a_marker_under_any_stack_is_found(
    marker, before, after, charset, declared, as_docx, stack
):
    simplified, traditional, marker_id = marker
    mark = traditional if charset == "big5" else simplified
    text = f"{before}。\n{mark} {after}。\n"
    if charset == "big5":
        for word, trad in TRADITIONAL.items():
            text = text.replace(word, trad)
    body, classes = build_classified(text, charset, declared, as_docx, stack)
    assume(not classes & KNOWN_FAILURES)  # a known failure: its own tests below
    result = scan(body)
    found = {h.marker_id for h in SHIPPED.hits(result.found)}
    assert marker_id in found or result.unscannable, (
        f"{marker_id} not found and not unscannable: charset={charset} declared={declared} "
        f"docx={as_docx} stack={stack} body={body.describe()} found={found}"
    )


def test_the_strategy_reaches_every_layer_and_depth():
    """The builder itself: each layer and a three-deep stack produce what they claim."""
    stack = [("zip", False), ("base64", False), ("gzip", True)]
    body = build("前文，季度报告。\n机密★5年 后文\n" * 3, "gbk", False, False, stack)
    assert body.encoding == "gzip" and gzip.decompress(body.data).isascii()
    assert "cn.classified.star" in {h.marker_id for h in SHIPPED.hits(scan(body).found)}
    for layer in LAYERS:
        body = build("会议纪要，" * 20 + "绝密★长期\n", "utf-8", True, False, [(layer, True)])
        result = scan(body)
        assert result.found and not result.unscannable, layer


# --- the failure classes, one deterministic test each (fixed inputs: zips with a fixed date,
# gzip with mtime 0), strict xfails while listed in KNOWN_FAILURES ---------------------------


@xfail_if_known(TEXT_FORM_WITHOUT_LABEL)
@settings(max_examples=30, deadline=None)
@given(marker=st.sampled_from(MARKERS), before=sentences, stack=lost_label_stacks("form"))
def test_a_text_form_without_its_label_is_read(marker, before, stack):
    simplified, _, marker_id = marker
    body = build(f"{before}。\n{simplified}\n", "utf-8", False, False, stack)
    result = scan(body)
    assert marker_id in {h.marker_id for h in SHIPPED.hits(result.found)} or result.unscannable


@xfail_if_known(MULTIPART_WITHOUT_LABEL)
@settings(max_examples=30, deadline=None)
@given(marker=st.sampled_from(MARKERS), before=sentences, stack=lost_label_stacks("multipart"))
def test_a_multipart_body_without_its_label_is_opened(marker, before, stack):
    simplified, _, marker_id = marker
    body = build(f"{before}。\n{simplified}\n", "utf-8", False, True, stack)
    result = scan(body)
    assert marker_id in {h.marker_id for h in SHIPPED.hits(result.found)} or result.unscannable


MIME_DOCX = base64.encodebytes(docx(NEWS))  # MIME: 76-character lines


def test_the_mime_docx_starts_a_zip_on_its_first_line():
    first = MIME_DOCX.split(b"\n", 1)[0]
    assert len(first) == 76 and base64.b64decode(first).startswith(b"PK\x03\x04")


@xfail_if_known(MIME_LINES_OF_A_ZIP)
def test_mime_wrapped_base64_of_a_docx_is_not_a_broken_zip():
    result = scan(Body(MIME_DOCX, "text/plain"))
    assert not result.unscannable, result.unscannable


LOST = ["gzip", "zip", "base64"]  # layers that drop the Content-Type of what they hold
GZIPPED_MARK = gzip.compress(("季度报告，" * 10 + "机密★5年\n").encode(), mtime=0)
PLAIN_ZIP = zip_commented({"word/document.xml": f"<w:document><w:t>{NEWS}</w:t></w:document>"}, b"")
LONG_MARKED_UTF16 = Body(
    ("季度报告，" * 8 + "。\n机密★5年 会议纪要。\n").encode("utf-16"), text=False
)


def _form_of(binary: bytes) -> Body:
    return Body(f"a=1&memo={quote(_b64(binary))}&b=2".encode(), "application/x-www-form-urlencoded")


def _json_form(inner: Body, outer: str) -> Body:
    for layer, label in [("json", True), ("form", False), (outer, False)]:
        inner = wrap(inner, layer, label)
    return inner


def test_the_fixed_inputs_are_what_they_claim():
    for binary in (GZIPPED_MARK, PLAIN_ZIP):
        assert "+" in _b64(binary)  # the escape that cuts the run
    assert len(_b64(PLAIN_ZIP).split("+", 1)[0]) >= 64  # a run decoded alone: PK...
    assert all(len(_b64(inner)) < 64 for inner in SHORT_INSIDE.values())


def found_star(body: Body) -> bool:
    result = scan(body)
    return "cn.classified.star" in {h.marker_id for h in SHIPPED.hits(result.found)} or bool(
        result.unscannable
    )


@pytest.mark.parametrize("outer", LOST)
def test_base64_in_a_form_without_its_label_is_read(outer):
    assert found_star(wrap(_form_of(GZIPPED_MARK), outer, False))


@pytest.mark.parametrize(
    "outer", [pytest.param(o, marks=known(BASE64_ZIP_IN_UNLABELLED_FORM)) for o in LOST]
)
def test_base64_zip_in_a_form_without_its_label_is_no_false_block(outer):
    result = scan(wrap(_form_of(PLAIN_ZIP), outer, False))
    assert not result.unscannable, result.unscannable


SHORT_INSIDE = {
    "gzip": gzip.compress("机密★5年".encode(), mtime=0),
    "utf-16": "机密★5年".encode("utf-16"),
    "base64-again": _b64("机密★5年".encode()).encode(),
    "big5": "機密★5年".encode("big5"),
}


@pytest.mark.parametrize(
    "inner", [pytest.param(k, marks=known(SHORT_BASE64_OF_ENCODED)) for k in sorted(SHORT_INSIDE)]
)
@pytest.mark.parametrize("where", ["text", "json"])
def test_short_base64_of_encoded_bytes_is_read(inner, where):
    encoded = _b64(SHORT_INSIDE[inner])
    body = (
        Body(f"memo={encoded}".encode(), "text/plain")
        if where == "text"
        else Body(json.dumps({"memo": encoded}).encode(), "application/json")
    )
    assert found_star(body)


@pytest.mark.parametrize(
    "outer", [pytest.param(o, marks=known(MIME_BASE64_IN_JSON_IN_UNLABELLED_FORM)) for o in LOST]
)
def test_mime_base64_in_json_in_an_unlabelled_form_is_read(outer):
    assert found_star(_json_form(LONG_MARKED_UTF16, outer))


@pytest.mark.parametrize(
    "outer", [pytest.param(o, marks=known(MIME_BASE64_IN_JSON_IN_UNLABELLED_FORM)) for o in LOST]
)
def test_mime_base64_in_json_in_an_unlabelled_form_is_no_false_block(outer):
    result = scan(_json_form(Body(PLAIN_ZIP, text=False), outer))
    assert not result.unscannable, result.unscannable


def test_mime_base64_in_json_in_a_labelled_form_is_read():
    """The same nesting with the form's label kept (a multipart part): read, no false block."""
    marked = wrap(wrap(wrap(LONG_MARKED_UTF16, "json", True), "form", False), "multipart", False)
    assert found_star(marked)
    plain = wrap(wrap(Body(PLAIN_ZIP, text=False), "json", True), "form", False)
    assert not scan(plain).unscannable


# --- (b) the marker words in prose never block ----------------------------------------------------

PROSE = [
    "根据《反不正当竞争法》，侵犯商业秘密的行为应承担民事责任",
    "本案涉及商业秘密的认定问题，法院审理后作出判决",
    "企业应当建立商业秘密保护制度，明确保密措施",
    "信息安全的三个目标是机密性、完整性和可用性",
    "加密算法保障数据的机密性",
    "科学家们正在揭开深海生物发光的秘密",
    "这部电影讲述了一段尘封多年的秘密往事",
    "展览首次公开了一批绝密档案的复制件",
    "电视剧讲述了抗战时期传递机密情报的故事",
    "他小声说，这件事很机密，别告诉别人",
    "《绝密飞行》是一部科幻电影",
    "The plan was top secret, she said, and laughed",
    "This e-mail may contain confidential information",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from(PROSE + WORDS), min_size=1, max_size=8),
    joins=st.lists(st.sampled_from(["，", "。", "；", "。\n", "\n", " "]), min_size=8, max_size=8),
    charset=st.sampled_from(["utf-8", "gbk", "gb18030", "utf-16"]),
    as_docx=st.booleans(),
    stack=layer_stacks(),
)
def test_marker_words_in_prose_never_block(parts, joins, charset, as_docx, stack):
    text = "".join(p + j for p, j in zip(parts, joins, strict=False)) + "\n"
    body, classes = build_classified(text, charset, True, as_docx, stack)
    assume(not classes & KNOWN_FAILURES)  # a known failure: its own tests below
    result = scan(body)
    blocks = [h for h in SHIPPED.hits(result.found) if h.action == "block"]
    assert not blocks and not result.unscannable, (
        f"benign text blocked: {blocks} {result.unscannable!r}; text={text!r} "
        f"charset={charset} docx={as_docx} stack={stack}"
    )
