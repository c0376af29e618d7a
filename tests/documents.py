"""Test documents built in code: Office files, ODF, PDF, archives, texts — so the tests carry
no opaque binaries and every marker's place is visible here."""

from __future__ import annotations

import io
import zipfile

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
