"""Host normalization and the suffix-map matcher: the edge cases a blocklist gets wrong."""

import pytest

from egress_guard.core.blocklist import HostIndex, Reason, Rule
from egress_guard.core.hosts import normalize_host, normalize_path, validate_host_pattern

R = Reason("en", "zh")


def rule(rid, hosts=(), exact=(), paths=(), action="block", category="webmail"):
    return Rule(
        rid, category, action, R, hosts=tuple(hosts), exact_hosts=tuple(exact), paths=tuple(paths)
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("MAIL.QQ.COM", "mail.qq.com"),
        ("mail.qq.com.", "mail.qq.com"),
        ("mail.qq.com:443", "mail.qq.com"),
        ("Mail.QQ.com.:8080", "mail.qq.com"),
        ("[::1]:8080", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("2001:db8:0:0::1", "2001:db8::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("邮箱.中国", "邮箱.中国".encode("idna").decode()),  # stdlib IDNA 2003 agrees
        ("XN--C0ZU34B.XN--FIQS8S", "xn--c0zu34b.xn--fiqs8s"),
        ("ｍａｉｌ．ｑｑ．ｃｏｍ", "mail.qq.com"),  # full-width letters and dots fold (UTS 46)
    ],
)
def test_normalize_host(raw, expected):
    assert normalize_host(raw) == expected


def test_suffix_rule_covers_domain_and_subdomains_only():
    index = HostIndex.build([rule("webmail.qq", ["qq.com"])])
    assert index.lookup("qq.com", "/").rule.id == "webmail.qq"
    assert index.lookup("mail.qq.com", "/").rule.id == "webmail.qq"
    assert index.lookup("a.b.mail.qq.com", "/").rule.id == "webmail.qq"
    assert index.lookup("notmail.qq.com.evil.net", "/") is None
    assert index.lookup("evilqq.com", "/") is None
    assert index.lookup("qq.com.cn", "/") is None


def test_exact_host_form_does_not_cover_subdomains():
    index = HostIndex.build([rule("webmail.outlook", exact=["outlook.com"])])
    assert index.lookup("outlook.com", "/").rule.id == "webmail.outlook"
    assert index.lookup("autodiscover.outlook.com", "/") is None


def test_ip_literal_rule_is_exact():
    index = HostIndex.build([rule("x.ip", [validate_host_pattern("88.191.122.25")])])
    assert index.lookup("88.191.122.25", "/").rule.id == "x.ip"
    assert index.lookup(normalize_host("::ffff:88.191.122.25"), "/").rule.id == "x.ip"
    assert index.lookup("1.88.191.122.25", "/") is None


def test_path_prefix_rules_on_a_shared_host():
    index = HostIndex.build(
        [
            rule("webmail.icloud", exact=["www.icloud.com"], paths=["/mail"]),
            rule(
                "cloud_drive.icloud",
                exact=["www.icloud.com"],
                paths=["/iclouddrive"],
                category="cloud_drive",
            ),
        ]
    )
    assert index.lookup("www.icloud.com", "/mail/inbox?x=1").rule.id == "webmail.icloud"
    assert index.lookup("www.icloud.com", "/iclouddrive/").rule.id == "cloud_drive.icloud"
    assert index.lookup("www.icloud.com", "/photos/") is None
    # At CONNECT time (no path yet) a path rule cannot answer, but the tunnel must be opened.
    assert index.lookup("www.icloud.com", None) is None
    assert index.has_path_rules("www.icloud.com")
    assert not index.has_path_rules("www.example.com")


@pytest.mark.parametrize(
    "path",
    ["/MAIL/", "//mail", "/x/../mail", "/%6dail", "/./mail", "/mail?x", "mail"],
)
def test_path_tricks_still_match(path):
    index = HostIndex.build([rule("webmail.shared", exact=["shared.example"], paths=["/mail"])])
    assert index.lookup("shared.example", path) is not None, normalize_path(path)


def test_most_specific_rule_wins_and_allow_wins_ties():
    index = HostIndex.build(
        [
            rule("block.corp", ["corp.example"]),
            rule("allow.mail", ["mail.corp.example"], action="allow", category="company"),
            rule("block.mail-upload", ["mail.corp.example"], paths=["/upload"]),
            rule("block.tie", ["tie.example"]),
            rule("allow.tie", ["tie.example"], action="allow", category="company"),
        ]
    )
    assert index.lookup("www.corp.example", "/").rule.id == "block.corp"
    assert index.lookup("mail.corp.example", "/inbox").rule.id == "allow.mail"
    assert index.lookup("mail.corp.example", "/upload/1").rule.id == "block.mail-upload"
    assert index.lookup("tie.example", "/").rule.id == "allow.tie"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("https://mail.qq.com", "scheme"),
        ("mail.qq.com/inbox", "path"),
        ("*.qq.com", "wildcard"),
        ("mail.qq.com:443", "port"),
        ("", "empty"),
        ("bad_host..com", "not a valid host"),
    ],
)
def test_bad_host_patterns_are_refused_with_a_reason(raw, problem):
    with pytest.raises(ValueError, match=problem):
        validate_host_pattern(raw)


def test_lookup_cost_does_not_grow_with_the_list():
    """Dict probes per lookup, counted: the same for 10 and 10 000 rules."""

    class CountingDict(dict):
        probes = 0

        def get(self, key, default=None):
            CountingDict.probes += 1
            return super().get(key, default)

    def probes_for(n):
        index = HostIndex.build([rule(f"r.{i}", [f"svc{i}.example{i % 97}.com"]) for i in range(n)])
        index._by_host = CountingDict(index._by_host)
        CountingDict.probes = 0
        for host in ("a.b.svc5.example5.com", "www.unlisted.org", "x.y.z.example.net"):
            index.lookup(host, "/")
        return CountingDict.probes

    assert probes_for(10) == probes_for(10_000) == 5 + 3 + 5  # one probe per label of each host
