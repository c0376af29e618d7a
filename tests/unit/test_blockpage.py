"""The block page: every value escaped (the template auto-escapes), nothing fetched."""

from datetime import UTC, datetime

from egress_guard.runtime import blockpage


def refusal(**changes) -> blockpage.Refusal:
    fields = dict(
        status=403,
        title_en="Access blocked",
        title_zh="已阻止访问",
        reason_en="Not allowed.",
        reason_zh="不允许。",
        category="webmail",
        rule_id="webmail.qq-mail",
        user="zhang.wei",
        client_ip="10.1.2.3",
        host="mail.qq.com",
        request_id="req-1",
        when=datetime(2026, 12, 2, 8, 0, tzinfo=UTC),
    )
    return blockpage.Refusal(**{**fields, **changes})


def test_values_cannot_carry_markup():
    page = blockpage.render(
        refusal(user='<img src=x onerror="alert(1)">', host="a&b", details=(("<k>", "<v>"),))
    ).decode()
    assert "<img" not in page and "&lt;img src=x" in page
    assert "a&amp;b" in page and "&lt;k&gt;" in page and "&lt;v&gt;" in page


def test_the_page_names_what_an_approver_needs_and_fetches_nothing():
    page = blockpage.render(refusal()).decode()
    for shown in ("webmail.qq-mail", "mail.qq.com", "zhang.wei", "req-1", "已阻止访问"):
        assert shown in page
    assert "<script" not in page and "http" not in page.split("<footer>")[0].lower()
    assert blockpage.headers(refusal())["Content-Security-Policy"].startswith("default-src 'none'")
