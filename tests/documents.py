"""Test documents built in code: Office files, ODF, PDF, archives, texts — so the tests carry
no opaque binaries and every marker's place is visible here."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

NEWS = (
    "新华社北京11月20日电 国家统计局今天发布数据，前三季度国内生产总值同比增长5.2%。"
    "专家表示，消费和投资保持稳定，经济运行总体平稳。科学家们正在揭开深海生物发光的秘密，"
    "这项研究有望推动新材料的发展。\n"
    "另据报道，某电视剧讲述了抗战时期传递机密情报的故事，引发观众热议。\n"
)
LEGAL_ARTICLE = (
    "商业秘密保护的法律框架\n"
    "《中华人民共和国反不正当竞争法》第九条规定，商业秘密是指不为公众所知悉、具有商业价值并经"
    "权利人采取相应保密措施的技术信息、经营信息等商业信息。侵犯商业秘密的行为包括以盗窃、贿赂、"
    "欺诈、胁迫、电子侵入或者其他不正当手段获取权利人的商业秘密。\n"
    "实践中，不少企业将商业秘密分为核心商密和普通商密两级管理，并在文件上标注密级。"
    "最高人民法院发布的商业秘密纠纷典型案例显示，保密措施是否合理是审理的关键。\n"
    "This article is for general information and is not confidential legal advice.\n"
)


def docx(
    body: str, header: str = "", footer: str = "", comment: str = "", split_runs: bool = True
) -> bytes:
    """A minimal .docx. Runs are split character by character (unless ``split_runs`` is off)
    so a marker spans XML tags, as Word does when a text was edited."""

    def runs(text: str) -> str:
        if not split_runs:
            return "".join(f"<w:r><w:t>{line}</w:t></w:r></w:p><w:p>" for line in text.split("\n"))
        return "".join(f"<w:r><w:t>{ch}</w:t></w:r>" for ch in text)

    ns = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
    parts = {
        "[Content_Types].xml": '<?xml version="1.0"?><Types xmlns="http://schemas.'
        'openxmlformats.org/package/2006/content-types"/>',
        "word/document.xml": f'<?xml version="1.0"?><w:document {ns}><w:body><w:p>'
        f"{runs(body)}</w:p></w:body></w:document>",
    }
    if header:
        parts["word/header1.xml"] = f"<w:hdr {ns}><w:p>{runs(header)}</w:p></w:hdr>"
    if footer:
        parts["word/footer1.xml"] = f"<w:ftr {ns}><w:p>{runs(footer)}</w:p></w:ftr>"
    if comment:
        parts["word/comments.xml"] = (
            f"<w:comments {ns}><w:comment><w:p>{runs(comment)}</w:p></w:comment></w:comments>"
        )
    return zip_of(parts)


def xlsx(cells: list[str]) -> bytes:
    shared = "".join(f"<si><t>{c}</t></si>" for c in cells)
    return zip_of(
        {"[Content_Types].xml": "<Types/>", "xl/sharedStrings.xml": f"<sst>{shared}</sst>"}
    )


def pptx(slide_text: str) -> bytes:
    return zip_of(
        {
            "[Content_Types].xml": "<Types/>",
            "ppt/slides/slide1.xml": f"<p:sld><a:p><a:r><a:t>{slide_text}</a:t></a:r>"
            "</a:p></p:sld>",
        }
    )


def odt(text: str, header: str = "") -> bytes:
    return zip_of(
        {
            "mimetype": "application/vnd.oasis.opendocument.text",
            "content.xml": f"<office:document-content><text:p>{text}</text:p>"
            "</office:document-content>",
            "styles.xml": f"<office:document-styles><style:header><text:p>{header}"
            "</text:p></style:header></office:document-styles>",
        }
    )


def zip_of(files: dict[str, str | bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content.encode() if isinstance(content, str) else content)
    return out.getvalue()


def pdf(lines: list[str]) -> bytes:
    """A one-page PDF with ASCII text lines (Helvetica), xref offsets computed."""
    text = " ".join(f"({line}) Tj 0 -20 Td" for line in lines)
    stream = f"BT /F1 18 Tf 72 720 Td {text} ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, obj)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


# --- media: structurally valid files, so a decoder can tell real media from a label -----------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(text_chunks: dict[str, str] | None = None) -> bytes:
    """A 1×1 grey PNG; ``text_chunks`` become tEXt (Latin-1) or iTXt (UTF-8) chunks."""
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    for key, value in (text_chunks or {}).items():
        if value.isascii():
            out += _png_chunk(b"tEXt", key.encode() + b"\0" + value.encode())
        else:
            out += _png_chunk(b"iTXt", key.encode() + b"\0\0\0\0\0" + value.encode())
    out += _png_chunk(b"IDAT", zlib.compress(b"\x00\x80"))
    return out + _png_chunk(b"IEND", b"")


def jpeg(comment: bytes = b"") -> bytes:
    """A structurally valid baseline JPEG (SOI, APP0 JFIF, optional COM, DQT, SOF0, DHT, SOS,
    entropy-coded data with a stuffed 0xFF and a restart marker, EOI)."""

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    out = b"\xff\xd8" + segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0")
    if comment:
        out += segment(0xFE, comment)
    out += segment(0xDB, b"\0" + bytes(range(1, 65)))
    out += segment(0xC0, b"\x08\0\x01\0\x01\x01\x01\x11\0")
    out += segment(0xC4, b"\0" + b"\x01" + b"\0" * 15 + b"\0")
    out += segment(0xDA, b"\x01\x01\0\0\x3f\0")
    return out + b"\x12\x34\xff\x00\x56\xff\xd0\x78" + b"\xff\xd9"


def gif(comment: bytes = b"") -> bytes:
    """A 1×1 GIF89a, with a comment extension if given."""
    out = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    if comment:
        out += (
            b"\x21\xfe"
            + b"".join(
                bytes([len(comment[i : i + 255])]) + comment[i : i + 255]
                for i in range(0, len(comment), 255)
            )
            + b"\x00"
        )
    return out + b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b"


def multipart(
    fields: list[tuple[str, str, str, bytes]], boundary: str = "eg-boundary-7MA4YWxk"
) -> tuple[bytes, str]:
    """(name, filename, content type, content) parts → (body, Content-Type header)."""
    out = bytearray()
    for name, filename, ctype, content in fields:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


# --- evasion suite helpers (tests/e2e/test_evasion_e2e.py, tests/unit/test_evasion_properties.py)


def _pdf_text_string(text: str) -> bytes:
    """A PDF text string any reader decodes: UTF-16BE with its BOM, as a hex string."""
    return b"<FEFF" + text.encode("utf-16-be").hex().upper().encode() + b">"


def pdf_objects(objects: list[bytes]) -> bytes:
    """A PDF from numbered objects (object 1 the catalog), xref offsets computed."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, obj)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def pdf_hidden(
    page_text: str = "Quarterly plan",
    annotation: str = "",
    field: str = "",
    attachment: bytes = b"",
    attachment_name: str = "memo.txt",
) -> bytes:
    """A one-page PDF whose page text is ``page_text`` (ASCII) and which carries more text
    where page-text extraction does not look: a note annotation's /Contents, an AcroForm text
    field's value (/V), or an embedded file (the /EmbeddedFiles name tree)."""
    stream = b"BT /F1 18 Tf 72 720 Td (%s) Tj ET" % page_text.encode("latin-1")
    annots = b" /Annots [6 0 R]" if annotation else b""
    catalog = b"<< /Type /Catalog /Pages 2 0 R"
    if field:
        catalog += b" /AcroForm << /Fields [7 0 R] >>"
    if attachment:
        catalog += b" /Names << /EmbeddedFiles << /Names [(%s) 8 0 R] >> >>" % (
            attachment_name.encode("latin-1")
        )
    objects = [
        catalog + b" >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >>%s >>" % annots,
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Type /Annot /Subtype /Text /Rect [100 100 120 120] /Contents %s >>"
        % _pdf_text_string(annotation or "-"),
        b"<< /FT /Tx /T (memo) /V %s /Rect [100 600 300 620] /Subtype /Widget /P 3 0 R >>"
        % _pdf_text_string(field or "-"),
        b"<< /Type /Filespec /F (%s) /UF (%s) /EF << /F 9 0 R >> >>"
        % (attachment_name.encode("latin-1"), attachment_name.encode("latin-1")),
        b"<< /Type /EmbeddedFile /Length %d >>\nstream\n%s\nendstream"
        % (len(attachment), attachment),
    ]
    return pdf_objects(objects)


def rtf_unicode(text: str) -> bytes:
    """An RTF document whose non-ASCII characters are \\uN? escapes (signed 16-bit)."""
    out = []
    for ch in text:
        n = ord(ch)
        if n < 128:
            out.append(ch)
        else:
            out.append(f"\\u{n - 65536 if n > 32767 else n}?")
    return ("{\\rtf1\\ansi\\deff0{\\fonttbl{\\f0 Arial;}}\\f0 " + "".join(out) + "\\par}").encode()


def rtf_codepage(text: str, codepage: int = 936) -> bytes:
    """An RTF document in \\ansicpg``codepage`` whose non-ASCII bytes are \\'hh escapes."""
    raw = text.encode(f"cp{codepage}")
    escaped = "".join(chr(b) if b < 128 else f"\\'{b:02x}" for b in raw)
    return (
        f"{{\\rtf1\\ansi\\ansicpg{codepage}\\deff0{{\\fonttbl{{\\f0\\fcharset134 SimSun;}}}}"
        f"\\f0 {escaped}\\par}}"
    ).encode()


def eml(
    subject: str, body: str = "见附件。", attachments: list[tuple[str, str, bytes]] = ()
) -> bytes:
    """A message/rfc822 file (.eml): the subject as an RFC 2047 encoded word, the body and
    each (file name, content type, content) attachment base64 in 76-character lines."""
    from email.message import EmailMessage
    from email.policy import SMTP

    msg = EmailMessage()
    msg["From"] = "zhang.wei@example.com"
    msg["To"] = "partner@example.net"
    msg["Subject"] = subject
    msg.set_content(body, cte="base64")
    for name, ctype, content in attachments:
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=name)
    if attachments:
        msg.set_boundary("eml-boundary-3k9Qx")  # reproducible bytes
    return msg.as_bytes(policy=SMTP)


def zip_commented(
    files: dict[str, str | bytes], comment: bytes, member_comment: bytes = b""
) -> bytes:
    """A zip archive with an archive comment (and, optionally, a comment on every member)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.comment = member_comment
            zf.writestr(info, content.encode() if isinstance(content, str) else content)
        zf.comment = comment
    return out.getvalue()


def tar_of(files: dict[str, bytes]) -> bytes:
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 1_767_225_600
            tf.addfile(info, io.BytesIO(content))
    return out.getvalue()


# --- benign texts that talk about secrets (false-positive checks for the marker scan) --------

FILM_LISTINGS = (
    "本周影讯：经典谍战片《绝密飞行》《绝密使命》重映，电视剧《绝密543》《秘密访客》热播，"
    "儿童剧《秘密花园》周末加演。\n"
    "《机密任务》导演表示，影片根据真实事件改编。\n"
    "We watched Top Secret! (1984) and Confidential Agent last night; the plot is top secret.\n"
)
TEXTBOOK = (
    "第三章 信息安全基础\n"
    "信息安全的三个基本目标是机密性、完整性和可用性（CIA）。机密性指信息不被未授权者获取；"
    "加密是保障机密性的主要手段。\n"
    "习题：试述机密性与完整性的区别。\n"
)
EMAIL_FOOTERS = (
    "此致\n敬礼\n——\n本邮件及其附件可能包含机密信息，仅供指定收件人使用。如您误收本邮件，"
    "请通知发件人并删除，谢谢。\n",
    "本邮件可能包含公司商业秘密，未经许可不得转发。\n",
    "Best regards,\nZhang Wei\n--\nThis e-mail and any attachments may contain confidential "
    "information and are intended solely for the addressee.\n",
    "Regards,\nLi Na\n\nCONFIDENTIALITY NOTICE: This e-mail is intended only for the person to "
    "whom it is addressed. If you received it in error, please delete it.\n",
)
# How a company's own training material talks about its grading scheme: every grade in running
# text (an alert for a person to look at), definitions, and the 国资委 rule it follows.
GRADE_TRAINING = (
    "商业秘密保护培训材料\n"
    "根据《中央企业商业秘密保护暂行规定》，商业秘密的密级分为核心商业秘密（核心商密）和普通"
    "商业秘密（普通商密）两级，密级标注统一为“核心商密”“普通商密”。\n"
    "核心商密：是指泄露会使企业的经济利益遭受特别严重损害的商业秘密。\n"
    "核心商密、普通商密的确定由业务部门拟定，主管领导审批，保密办公室备案。\n"
    "问：核心商密可以通过个人邮箱发送吗？答：不可以。\n"
    "所谓“一级商密”，在部分企业中与核心商密相当；《核心商密管理办法（试行）》另有规定。\n"
    "核心商密的保密期限一般不超过10年，普通商密的保密期限一般不超过5年。\n"
)
