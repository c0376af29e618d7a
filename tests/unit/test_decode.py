"""The decoders see what a receiving server sees: typed by content, never by label; every value
of a container; every listed encoding undone; every limit kept.

Each test names the leak it closes: before the change, the marker in its body went unseen (or a
benign body was refused). A few are guards that held before too: the declared charset is still
read first, real media is still skipped, split runs still join, brotli with trailing data is
still refused, plain UTF-8 still takes the one-reading path."""

from __future__ import annotations

import base64
import bz2
import gzip
import json
import lzma
import tracemalloc
import zlib
from urllib.parse import quote_from_bytes, urlencode

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from documents import (
    docx,
    eml,
    gif,
    jpeg,
    multipart,
    pdf_hidden,
    png,
    rtf_codepage,
    rtf_unicode,
    tar_of,
    zip_commented,
    zip_of,
)
from egress_guard.core.decode import Budget, Unscannable, extract_texts, texts_of
from egress_guard.core.policy import load_policy
from egress_guard.core.scan import scan_body
from support import POLICIES

POLICY = load_policy(POLICIES).markers
SHIPPED = POLICY.markers

STAR = "cn.classified.star"  # 绝密★ / 机密★ / 秘密★: blocks
MARKED = "项目进度汇报\n机密★5年\n本季度完成了三项评审。\n"
MARKED_TRADITIONAL = "項目進度匯報\n機密★5年\n本季度完成了三項評審。\n"  # Big5 has no 项
PROSE = "本季度的工作按计划推进，各部门协同良好，下一阶段重点是交付质量与成本控制。\n" * 3


def body_ids(data: bytes, content_type: str = "", encoding: str = "") -> set[str]:
    result = scan_body(SHIPPED, data, content_type, encoding, POLICY.limits)
    assert not result.unscannable, result.unscannable
    return {h.marker_id for h in SHIPPED.hits(result.found)}


def unscannable(data: bytes, content_type: str = "", encoding: str = "", **limits) -> str:
    budget = Budget(**limits) if limits else None
    try:
        for text in extract_texts(data, content_type, encoding, budget):
            SHIPPED.find(text)
    except Unscannable as e:
        return str(e)
    return ""


# --- 1. labels are not believed ---------------------------------------------------------------

# (a) A declared charset that is not the body's: the declared one, and the plausible others.


@pytest.mark.parametrize(
    ("actual", "declared"),
    [
        ("gbk", "utf-8"),
        ("gb18030", "utf-8"),
        ("gbk", "iso-8859-1"),  # Latin-1 decodes any byte: no error to notice, only nonsense
        ("big5", "windows-1252"),
        ("utf-16-le", "utf-8"),
        ("utf-16-le", "iso-8859-1"),
        ("utf-16-be", "gbk"),
        ("utf-8", "gbk"),  # the reverse: UTF-8 bytes read as GBK are mojibake, not errors
        ("utf-8", "big5"),
        ("utf-8", "iso-8859-1"),
        ("utf-8", "utf-16"),
        ("gbk", "big5"),
    ],
)
def test_a_wrong_declared_charset_is_not_believed(actual, declared):
    text = MARKED_TRADITIONAL if actual == "big5" else MARKED
    assert STAR in body_ids(text.encode(actual), f"text/plain; charset={declared}")


def test_the_declared_charset_is_still_read_first():
    assert texts_of("机密★".encode("gbk"), "gbk") == ["机密★"]
    assert texts_of("Prix: 10 €, été".encode("cp1252"), "windows-1252") == ["Prix: 10 €, été"]


# (b) One invalid byte in otherwise-UTF-8 text sent it to the GB18030/Big5 fallbacks only.


@pytest.mark.parametrize("where", [0, 20, -1])
def test_one_invalid_byte_does_not_hide_utf8_text(where):
    raw = bytearray((PROSE + MARKED).encode())
    raw.insert(where if where >= 0 else len(raw), 0xFF)
    assert STAR in body_ids(bytes(raw), "text/plain")
    assert STAR in body_ids(bytes(raw), "text/plain; charset=utf-8")


# (c) Media labels and media magic bytes: believed only when the bytes really are that media.


@pytest.mark.parametrize("ctype", ["image/png", "image/jpeg", "video/mp4", "audio/mpeg"])
def test_a_media_content_type_on_a_text_body(ctype):
    assert STAR in body_ids(MARKED.encode(), ctype)


@pytest.mark.parametrize(
    "magic",
    [
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0",
        b"GIF89a",
        b"ID3\x04\x00",
        b"OggS\x00",
        b"fLaC",
    ],
)
def test_media_magic_in_front_of_text(magic):
    assert STAR in body_ids(magic + MARKED.encode(), "application/octet-stream")
    assert STAR in body_ids(magic + MARKED.encode(), "image/png")


def test_media_magic_then_binary_padding_then_text():
    # Padding that makes the head look binary must not make the text after it invisible.
    body = b"\x89PNG\r\n\x1a\n" + bytes(range(32)) * 64 + MARKED.encode()
    assert STAR in body_ids(body, "image/png")


@pytest.mark.parametrize(
    "media",
    [png(), jpeg(), gif()],
    ids=["png", "jpeg", "gif"],
)
def test_text_after_the_end_of_real_media_is_scanned(media):
    assert body_ids(media, "image/png") == set()  # real media alone: nothing to find
    assert STAR in body_ids(media + MARKED.encode(), "image/png")
    assert STAR in body_ids(media + docx("正文", header="机密★5年"), "")


@pytest.mark.parametrize(
    "media",
    [
        png({"Comment": "机密★5年"}),
        png({"Description": "TOP SECRET"}),
        jpeg(comment="机密★5年".encode()),
        gif(comment="机密★5年".encode()),
    ],
    ids=["png iTXt", "png tEXt", "jpeg COM", "gif comment"],
)
def test_text_carried_inside_real_media_is_scanned(media):
    assert body_ids(media, "image/png") & {STAR, "en.top-secret.label"}


def test_real_media_is_still_skipped():
    assert list(extract_texts(png(), "image/png")) == []
    assert list(extract_texts(gif(), "image/gif")) == []
    # A JPEG's APPn segments are read (Exif and XMP carry text): here only the JFIF header.
    assert all(t.startswith("JFIF") for t in extract_texts(jpeg(), ""))


# (d) A multipart part typed or named as a picture.


@pytest.mark.parametrize(
    ("filename", "ctype"),
    [("", "image/png"), ("cat.png", ""), ("cat.png", "image/png"), ("clip.mp4", "video/mp4")],
)
def test_a_multipart_part_labelled_as_media_carrying_text(filename, ctype):
    body, content_type = multipart([("f", filename, ctype, MARKED.encode())])
    assert STAR in body_ids(body, content_type)


def test_a_multipart_part_labelled_as_media_carrying_a_docx():
    document = docx("正文", header="机密★5年")
    body, content_type = multipart([("f", "cat.png", "image/png", document)])
    assert STAR in body_ids(body, content_type)


# --- 2. parsers that saw less than a server ---------------------------------------------------


def test_json_duplicate_keys_every_value_is_scanned():
    # json.loads keeps the last value; a server's parser may keep the first.
    body = '{"note": "机密★5年", "note": "ok", "x": {"a": "绝密★", "a": 1}}'.encode()
    assert STAR in body_ids(body, "application/json")
    assert STAR in body_ids(b'{"a": {"b": "\\u7edd\\u5bc6\\u2605", "b": ""}}', "application/json")


def test_json_in_any_label_is_parsed():
    body = json.dumps({"doc": "机密★5年"}).encode()  # ensure_ascii: only \\uXXXX in the bytes
    assert STAR in body_ids(body, "application/octet-stream")
    assert STAR in body_ids(body, "text/html")


def test_json_lines_every_document():
    body = b"\n".join(json.dumps({"i": i, "t": t}).encode() for i, t in enumerate(["a", MARKED]))
    assert STAR in body_ids(body, "application/x-ndjson")


def test_json_that_does_not_parse_has_its_escapes_undone():
    body = b"{'title': '\\u673a\\u5bc6\\u2605\\u0035\\u5e74', }"  # JavaScript, not JSON
    assert STAR in body_ids(body, "application/json")


def test_multi_member_gzip_content_encoding():
    body = gzip.compress(PROSE.encode()) + gzip.compress(MARKED.encode())
    assert STAR in body_ids(body, "text/plain", "gzip")


def test_multi_member_gzip_by_magic():
    body = gzip.compress(PROSE.encode()) + gzip.compress(MARKED.encode())
    assert STAR in body_ids(body, "application/octet-stream")


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("", gzip.compress)],
)
def test_data_after_the_end_of_a_compressed_stream_is_scanned(encoding, compress):
    body = compress(PROSE.encode()) + MARKED.encode()
    assert STAR in body_ids(body, "text/plain", encoding)


def test_concatenated_zstd_frames():
    z = zstandard.ZstdCompressor()
    body = z.compress(PROSE.encode()) + z.compress(MARKED.encode())
    assert STAR in body_ids(body, "text/plain", "zstd")
    assert STAR in body_ids(body, "application/octet-stream")  # by its magic bytes


def test_data_after_a_brotli_stream_is_refused_not_dropped():
    import brotli

    assert unscannable(brotli.compress(PROSE.encode()) + MARKED.encode(), "", "br")


@pytest.mark.parametrize(
    "html",
    [
        '<form><input type="hidden" name="n" value="机密★5年"></form>',
        "<form><input value='机密★5年'></form>",
        "<form><input value=机密★5年></form>",
        '<img alt="TOP SECRET" src="x.png">',
        "<p>正文</p><!-- 机密★5年 -->",
        "<p>正文</p><!-- a > b 机密★5年 -->",
        "<doc><![CDATA[机密★5年]]></doc>",
        "<doc><![CDATA[a < b\n机密★5年\n]]></doc>",
        "<?xml version='1.0'?><?note 机密★5年?><doc/>",
        '<doc title="&#26426;&#23494;&#9733;5年"/>',
    ],
)
def test_markup_attributes_comments_cdata_and_processing_instructions(html):
    found = body_ids(html.encode(), "text/html") | body_ids(html.encode(), "application/xml")
    assert found & {STAR, "en.top-secret.label"}, html


def test_markup_still_joins_text_split_across_tags():
    html = "<p>机<b>密</b><span>★</span>5年</p>".encode()
    assert STAR in body_ids(html, "text/html")


def test_a_docx_attribute_value_is_scanned():
    document = zip_of(
        {
            "[Content_Types].xml": "<Types/>",
            "word/document.xml": "<w:document><w:body><w:p><w:r><w:t>正文</w:t></w:r></w:p>"
            '<w:sdt><w:sdtPr><w:alias w:val="机密★5年"/></w:sdtPr></w:sdt></w:body></w:document>',
        }
    )
    assert STAR in body_ids(document, "application/octet-stream")


def test_an_office_part_is_typed_by_content_not_by_its_name():
    inner = docx("正文", header="机密★5年")
    document = zip_of({"[Content_Types].xml": "<Types/>", "word/document.xml": inner})
    assert STAR in body_ids(document, "application/octet-stream")


# --- 3. encodings and containers --------------------------------------------------------------


def test_base64_wrapped_in_mime_lines():
    encoded = base64.encodebytes(docx("正文", header="机密★5年")).replace(b"\n", b"\r\n")
    assert max(len(line) for line in encoded.split(b"\r\n")) == 76
    assert STAR in body_ids(b"attachment:\r\n" + encoded, "text/plain")
    text = base64.encodebytes(("x" * 55 + MARKED).encode())  # the marker crosses a line end
    assert STAR in body_ids(text, "text/plain")
    assert STAR in body_ids(json.dumps({"file": text.decode()}).encode(), "application/json")


@pytest.mark.parametrize("marker", ["机密★5年", "绝密★", "TOP SECRET"])
def test_short_base64(marker):
    token = base64.b64encode(marker.encode()).decode()
    assert len(token) < 64
    expected = STAR if "★" in marker else "en.top-secret.label"
    assert expected in body_ids(json.dumps({"k": token}).encode(), "application/json")
    form = urlencode({"title": token, "x": 1}).encode()  # "+" sent as %2B, as browsers do
    assert expected in body_ids(form, "application/x-www-form-urlencoded")
    assert expected in body_ids(f"备注 {token} 完".encode(), "text/plain")
    unpadded = base64.urlsafe_b64encode(marker.encode()).decode().rstrip("=")
    assert expected in body_ids(json.dumps({"k": unpadded}).encode(), "application/json")


def test_short_base64_in_gbk():
    token = base64.b64encode("机密★5年".encode("gbk")).decode()
    assert STAR in body_ids(json.dumps({"k": token}).encode(), "application/json")


@pytest.mark.parametrize(
    "url",
    [
        "data:text/plain;base64," + base64.b64encode("机密★5年".encode()).decode(),
        "data:;base64," + base64.b64encode("绝密★".encode()).decode(),
        "data:text/plain;charset=gbk;base64," + base64.b64encode("机密★5年".encode("gbk")).decode(),
        "data:text/plain,%E6%9C%BA%E5%AF%86%E2%98%85",
        "data:text/plain;charset=utf-8,机密★5年",
    ],
)
def test_data_urls_inside_json_strings(url):
    assert STAR in body_ids(json.dumps({"avatar": url}).encode(), "application/json")


def test_a_data_url_with_a_media_type_carrying_a_document():
    url = "data:image/png;base64," + base64.b64encode(docx("正文", header="机密★5年")).decode()
    assert STAR in body_ids(json.dumps({"avatar": url}).encode(), "application/json")


@pytest.mark.parametrize("codec", ["utf-32-le", "utf-32-be", "utf-32"])
@pytest.mark.parametrize("declared", [False, True])
def test_utf32(codec, declared):
    ctype = f"text/plain; charset={codec}" if declared else "text/plain"
    assert STAR in body_ids(MARKED.encode(codec), ctype)
    assert STAR in body_ids((PROSE + MARKED).encode(codec), "")


JAPANESE = "機密★5年 社外秘\n新製品の価格表を送付します。\n"
KOREAN = "機密★5年 대외비\n신제품 가격표를 보내드립니다.\n"


@pytest.mark.parametrize("codec", ["shift_jis", "euc_jp", "iso2022_jp", "euc_kr", "cp932", "cp949"])
def test_undeclared_japanese_and_korean_encodings(codec):
    assert STAR in body_ids("報告書\n機密★5年\n".encode(codec), "text/plain")
    text = KOREAN if codec in ("euc_kr", "cp949") else JAPANESE
    assert STAR in body_ids(text.encode(codec), "")


@pytest.mark.parametrize("codec", ["hz", "utf-7"])
def test_seven_bit_encodings(codec):
    assert STAR in body_ids(MARKED.encode(codec), "text/plain")
    assert STAR in body_ids(MARKED.encode(codec), f"text/plain; charset={codec}")


def test_percent_escapes_in_a_text_value():
    from urllib.parse import quote

    assert STAR in body_ids(json.dumps({"next": quote(MARKED)}).encode(), "application/json")


def test_html_entities_in_plain_text():
    body = "".join(f"&#{ord(c)};" for c in "机密★5年").encode()
    assert STAR in body_ids(body, "text/plain")


@pytest.mark.parametrize(
    "compress",
    [
        bz2.compress,
        lzma.compress,  # xz
        lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),  # .lzma
        lambda d: bz2.compress(PROSE.encode()) + bz2.compress(d),  # concatenated (pbzip2)
        lambda d: lzma.compress(PROSE.encode()) + lzma.compress(d),
    ],
    ids=["bz2", "xz", "lzma", "bz2 streams", "xz streams"],
)
def test_bz2_and_xz_bodies_and_members(compress):
    packed = compress(MARKED.encode())
    assert STAR in body_ids(packed, "application/octet-stream")
    assert STAR in body_ids(zip_of({"notes.txt.bz2": packed}), "application/zip")
    assert STAR in body_ids(compress(docx("正文", header="机密★5年")), "")
    assert STAR in body_ids(packed + MARKED.encode("gbk"), "")  # and what follows the stream


def _arj_header() -> bytes:
    import zlib

    basic = bytes([30, 11, 1, 2, 2, 0, 0, 0]) + bytes(22)  # a 30-byte main header
    return (
        b"\x60\xea"
        + len(basic).to_bytes(2, "little")
        + basic
        + zlib.crc32(basic).to_bytes(4, "little")
    )


ARJ_HEADER = _arj_header()


@pytest.mark.parametrize(
    "magic",
    [
        b"\x04\x22\x4d\x18",  # lz4 frame
        b"\x02\x21\x4c\x18",  # lz4 legacy
        b"\x1f\x9d\x90",  # compress (.Z): block mode, 16-bit codes
        b"LZIP\x01",
        b"MSCF\x00\x00\x00\x00",  # cabinet
        ARJ_HEADER,
        b"\x28\xb5\x2f\xfd" + b"\x00" * 4,  # a broken zstd frame
        b"BZh91AY&SY" + b"\x00" * 8,  # a broken bzip2 stream
        b"\xfd7zXZ\x00" + b"\x00" * 8,  # a broken xz stream
    ],
)
def test_an_unknown_or_broken_compressed_format_is_unscannable(magic):
    assert unscannable(magic + bytes(range(256)) * 8, "application/octet-stream")


def test_random_bytes_that_begin_like_a_two_byte_magic_are_not_refused():
    """An encrypted file is random bytes: one in 65 536 starts with any given two bytes. The
    formats with a short magic are recognized only when what follows agrees (ARJ's header
    CRC, compress's flags byte), so such a file is not refused as an unknown archive."""
    import random

    rng = random.Random(7)
    for magic in (b"\x60\xea", b"\x1f\x9d", b"\x1f\xa0", b"\x1f\x1e"):
        for _ in range(200):
            blob = magic + rng.randbytes(4096)
            if magic == b"\x1f\x9d" and blob[2] & 0x60 == 0 and 9 <= blob[2] & 0x1F <= 16:
                continue  # a plausible compress header: refused, rightly
            assert not unscannable(blob, "application/octet-stream"), magic


def test_a_file_sent_raw_under_the_form_label_is_read_as_the_file_and_as_the_form():
    """curl --data-binary labels any file application/x-www-form-urlencoded. Random bytes hold
    an "&" every 256 bytes: read as a form, a 3 MiB file was thousands of "fields" and refused
    as unscannable. It is read as the file it is — and its
    pieces as the fields a server would parse, so a marking %-escaped between them is found."""
    import random

    rng = random.Random(11)
    form = "application/x-www-form-urlencoded"
    blob = rng.randbytes(3 * 1024 * 1024)  # ~12 000 "fields"
    assert not unscannable(blob, form)
    assert body_ids(blob, form) == set()
    escaped = quote_from_bytes(MARKED.encode()).encode()
    assert STAR in body_ids(
        rng.randbytes(4096) + b"&note=" + escaped + b"&" + rng.randbytes(99), form
    )
    assert STAR in body_ids(gzip.compress(MARKED.encode()) + rng.randbytes(4096), form)


def test_a_binary_keeps_every_run_a_marker_fits_in_and_drops_the_noise():
    """In a binary, ASCII runs shorter than the shortest ASCII marker are dropped (random bytes
    hold one every few bytes); a marker in ASCII, in CJK, or in ASCII with one look-alike
    letter (Cyrillic о) between random bytes is still found."""
    import random

    from egress_guard.core.charsets import binary_runs

    rng = random.Random(5)
    noise = rng.randbytes(256 * 1024)
    shortest = SHIPPED.shortest_ascii
    assert 3 < shortest <= len("top secret")
    assert len(binary_runs(noise, shortest)) < len(binary_runs(noise)) / 3
    for marking, marker in (
        ("CONFIDENTIAL", "en.confidential.label"),
        ("t\u043ep secret", "en.top-secret.label"),
        ("机密★", STAR),
    ):
        body = noise[:4096] + b"\x00" + marking.encode() + b"\x01" + noise[4096:]
        assert marker in body_ids(body, "application/octet-stream"), marking


def test_tar_archives_are_opened():
    inner = docx("正文", header="机密★5年")
    assert STAR in body_ids(tar_of({"a/report.docx": inner}), "application/x-tar")
    assert STAR in body_ids(gzip.compress(tar_of({"report.docx": inner})), "")
    assert STAR in body_ids(tar_of({"机密★5年.txt": b"x"}), "")  # a member's name


def test_rtf_unicode_escapes():
    assert STAR in body_ids(rtf_unicode(MARKED), "application/rtf")


@pytest.mark.parametrize("codepage", [936, 950])
def test_rtf_hex_escapes_in_the_documents_code_page(codepage):
    text = MARKED if codepage == 936 else MARKED_TRADITIONAL
    assert STAR in body_ids(rtf_codepage(text, codepage), "application/rtf")
    assert STAR in body_ids(rtf_codepage(text, codepage), "application/octet-stream")


def test_rtf_hex_escapes_in_a_fonts_charset():
    # Word writes Chinese as \'hh bytes in the font's charset (134 = GB2312) under \ansicpg1252.
    escaped = "".join(f"\\'{b:02x}" for b in "机密★5年".encode("gbk"))
    body = (
        "{\\rtf1\\ansi\\ansicpg1252"
        "{\\fonttbl{\\f0\\froman Times;}{\\f1\\fnil\\fcharset134 SimSun;}}"
        f"\\f0 Report\\par{{\\f1 {escaped}}}\\par}}"
    ).encode()
    assert STAR in body_ids(body, "text/rtf")


def test_rtf_plain_text_and_line_starts():
    body = b"{\\rtf1\\ansi\\deff0{\\fonttbl{\\f0 Arial;}}\\f0\\b TOP SECRET\\b0\\par Plan\\par}"
    assert "en.top-secret.label" in body_ids(body, "application/rtf")


def test_eml_encoded_word_headers():
    message = eml("机密★5年 合同")
    assert b"=?utf-8?b?" in message.lower()
    assert STAR in body_ids(message, "message/rfc822")
    assert STAR in body_ids(message, "application/octet-stream")  # by content


def test_eml_body_and_attachments():
    message = eml(
        "周报",
        body=PROSE + MARKED,
        attachments=[("a.docx", "application/octet-stream", docx("正文", header="绝密★"))],
    )
    assert STAR in body_ids(message, "message/rfc822")
    only_attachment = eml(
        "周报", attachments=[("a.docx", "application/octet-stream", docx("正文", header="绝密★"))]
    )
    assert STAR in body_ids(only_attachment, "message/rfc822")
    upload, ctype = multipart([("file", "mail.eml", "application/octet-stream", only_attachment)])
    assert STAR in body_ids(upload, ctype)


def test_eml_quoted_printable_body():
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = "周报"
    msg.set_content(PROSE + MARKED, cte="quoted-printable")
    assert b"=E6=9C=BA" in msg.as_bytes()
    assert STAR in body_ids(msg.as_bytes(), "message/rfc822")


@pytest.mark.parametrize(
    "document",
    [
        pdf_hidden(annotation="机密★5年"),
        pdf_hidden(field="机密★5年"),
        pdf_hidden(attachment=MARKED.encode()),
        pdf_hidden(attachment=docx("正文", header="机密★5年"), attachment_name="a.docx"),
    ],
    ids=["annotation", "form field", "attachment", "docx attachment"],
)
def test_pdf_annotations_fields_and_attachments(document):
    assert STAR in body_ids(document, "application/pdf")


def test_zip_archive_and_member_comments():
    assert STAR in body_ids(zip_commented({"a.txt": "x"}, "机密★5年".encode()), "")
    assert STAR in body_ids(zip_commented({"a.txt": "x"}, b"", "机密★5年".encode()), "")


def test_zip_member_names_in_a_legacy_code_page():
    # Chinese Windows zips write names in GBK without the UTF-8 flag; zipfile reads them as
    # cp437, an unzip on a Chinese system shows them as they were.
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("placeholder-name.txt", b"x")
    raw = out.getvalue()
    name = "机密★5年.txt".encode("gbk")
    assert len(name) <= len(b"placeholder-name.txt")
    raw = raw.replace(b"placeholder-name.txt", name.ljust(len(b"placeholder-name.txt"), b"_"))
    assert STAR in body_ids(raw, "application/zip")


def test_multipart_field_names_preamble_and_epilogue():
    body, ctype = multipart([("机密★5年", "", "", b"x")])
    assert STAR in body_ids(body, ctype)
    body, ctype = multipart([("a", "", "", b"x")])
    assert STAR in body_ids(MARKED.encode() + b"\r\n" + body + MARKED.encode(), ctype)


def test_multipart_by_content():
    body, _ = multipart([("f", "", "application/octet-stream", docx("正文", header="机密★5年"))])
    assert STAR in body_ids(body, "text/plain")


def test_utf16_without_a_bom_of_odd_length():
    assert STAR in body_ids(MARKED.encode("utf-16-le") + b"\n", "application/octet-stream")


def test_svg_labelled_as_an_image_is_text():
    svg = f'<svg xmlns="http://www.w3.org/2000/svg"><text x="0" y="20">{MARKED}</text></svg>'
    assert STAR in body_ids(svg.encode(), "image/svg+xml")


def test_a_form_without_its_label_is_read_as_a_form():
    # Inside base64, a zip member or gzip found by magic, a form has no Content-Type: its
    # values are read as a server reads them (%-escapes undone, each value a text).
    inner = json.dumps({"file": base64.encodebytes(docx("正文", header="机密★5年")).decode()})
    form = urlencode({"a": "1", "memo": inner}).encode()
    assert STAR in body_ids(gzip.compress(form), "")
    assert STAR in body_ids(urlencode({"memo": MARKED}).encode(), "text/plain")
    benign = urlencode({"memo": base64.b64encode(docx("正文")).decode()}).encode()
    assert body_ids(zip_of({"form.txt": benign}), "") == set()  # no false "broken zip"


def test_a_form_value_that_is_a_file():
    form = b"name=a.gz&file=" + quote_from_bytes(gzip.compress(MARKED.encode())).encode()
    assert STAR in body_ids(form, "application/x-www-form-urlencoded")


@pytest.mark.parametrize(
    "inner",
    [
        gzip.compress("机密★5年".encode(), mtime=0),
        "机密★5年".encode("utf-16"),
        base64.b64encode("机密★5年".encode()),
        "機密★5年".encode("big5"),
    ],
    ids=["gzip", "utf-16", "base64 again", "big5"],
)
def test_short_base64_of_encoded_bytes(inner):
    token = base64.b64encode(inner).decode()
    assert len(token) < 64
    assert STAR in body_ids(f"memo {token} end".encode(), "text/plain")
    assert STAR in body_ids(json.dumps({"memo": token}).encode(), "application/json")


def test_html_fragment_in_plain_text_joins_split_markers():
    assert STAR in body_ids("备注：机<b>密</b>★5年，见附件".encode(), "text/plain")


def test_javascript_escapes_join_base64_lines():
    encoded = base64.encodebytes(docx("正文", header="机密★5年")).decode()
    script = "var doc = '" + encoded.replace("\n", "\\n") + "';\n"  # a JS string literal
    assert STAR in body_ids(script.encode(), "application/javascript")


def test_rules_and_paths_are_not_taken_for_base64():
    text = "-" * 80 + "\nsee tests/unit/test-decode_files/path-like/names here\n" + "=" * 80
    assert list(extract_texts((text + "\n" + PROSE).encode(), "text/plain")) == [
        text + "\n" + PROSE
    ]


def test_a_zip_appended_to_something_else():
    inner = zip_of({"notes.txt": MARKED})
    assert STAR in body_ids(b"GIF89a not really a picture\n" + bytes(range(32)) + inner, "")


def test_a_pdf_with_bytes_before_its_header():
    document = pdf_hidden(annotation="机密★5年")
    assert STAR in body_ids(b"\x00\x01junk before the header\n" + document, "")


# --- limits -----------------------------------------------------------------------------------


def _bomb(compress, copies: int) -> bytes:
    return compress(b"\x00" * (8 * 1024 * 1024)) * copies  # concatenated streams: 8 MiB each


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress], ids=["bz2", "xz"])
def test_a_bz2_or_xz_bomb_is_unscannable_in_bounded_memory(compress):
    bomb = _bomb(compress, 32)  # 256 MiB of zeros
    tracemalloc.start()
    try:
        reason = unscannable(bomb, "application/octet-stream", max_expanded=16 * 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "expands to more than" in reason
    assert peak < 64 * 1024 * 1024, peak


def test_decompression_checks_the_clock_as_it_goes(monkeypatch):
    from egress_guard.core import budget as budget_module

    clock = iter(range(1, 10_000))
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: float(next(clock)))
    budget = Budget(max_expanded=1 << 40, max_seconds=20)
    with pytest.raises(Unscannable, match="took longer"):
        list(extract_texts(_bomb(bz2.compress, 64), "", "", budget))
    assert budget.expanded < 512 * 1024 * 1024  # stopped long before the end


def test_many_gzip_members_are_one_budget():
    bomb = gzip.compress(b"\x00" * (4 * 1024 * 1024)) * 16
    assert "expands to more than" in unscannable(bomb, "", "gzip", max_expanded=8 * 1024 * 1024)


def test_nested_compression_beyond_the_depth_limit():
    doc = MARKED.encode()
    for _ in range(8):
        doc = bz2.compress(doc)
    assert "nested deeper" in unscannable(doc, "", "", max_depth=4)


def test_plain_text_takes_the_fast_path():
    # The common case pays one decode: valid UTF-8 with nothing else in it is one text.
    raw = (PROSE * 200).encode()
    assert texts_of(raw, "utf-8") == [raw.decode()]
    assert texts_of(raw) == [raw.decode()]
    assert list(extract_texts(raw, "text/plain; charset=utf-8")) == [raw.decode()]


def test_no_markers_base64_looks_like_a_word():
    """Base64 runs that look like words (letters, lowercase after the first) are skipped: no
    shipped marker's base64 is one, in UTF-8 or GBK, in any letter case, at any alignment."""
    from egress_guard.core.decode import _a_word

    for marker in SHIPPED.markers:
        for pattern in marker.patterns:
            for spelling in {pattern, pattern.upper(), pattern.lower(), pattern.title()}:
                for codec in ("utf-8", "gbk"):
                    try:
                        raw = spelling.encode(codec)
                    except UnicodeEncodeError:
                        continue
                    for lead in (b"", b"a", b"ab"):  # the marker at each base64 alignment
                        token = base64.b64encode(lead + raw + b"xyz").decode().rstrip("=")
                        assert not _a_word(token), (spelling, codec, lead)
    assert _a_word("internationalization") and _a_word("Responsibilities")
    assert not _a_word("YVRPUCBTRUNSRVQ")  # base64 of "aTOP SECRET": all capitals


# --- fuzzing the new decoders: texts or a clear "unscannable", never another exception --------

NEW_FORMATS = [
    png({"Comment": "x"}),
    jpeg(comment=b"x"),
    gif(comment=b"x"),
    rtf_codepage("机密★5年"),
    eml("周报", attachments=[("a.bin", "application/octet-stream", b"\x00\x01")]),
    bz2.compress(MARKED.encode()),
    lzma.compress(MARKED.encode()),
    tar_of({"a.txt": b"x"}),
    pdf_hidden(annotation="x", field="y", attachment=b"z"),
    b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 12,
    b"RIFF\x10\x00\x00\x00WAVEdata\x04\x00\x00\x00abcd",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(NEW_FORMATS),
    cut=st.integers(min_value=0, max_value=4096),
    noise=st.binary(max_size=64),
    at=st.integers(min_value=0, max_value=4096),
)
def test_new_decoders_never_crash_on_damaged_input(base, cut, noise, at):
    damaged = base[:at] + noise + base[at + len(noise) :]
    for data in (damaged, damaged[: cut % (len(damaged) + 1)]):
        budget = Budget(max_expanded=1 << 20, max_depth=4, max_seconds=5)
        try:
            for text in extract_texts(data, "", "", budget):
                assert isinstance(text, str)
                SHIPPED.find(text)
        except Unscannable as e:
            assert str(e)
