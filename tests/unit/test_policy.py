"""Policy loading: the shipped default, and errors that name file, line and field."""

import os

import pytest

from egress_guard.core.decision import RequestFacts, decide, needs_interception
from egress_guard.core.destinations import DestinationRules, OwnSockets, check_destination
from egress_guard.core.policy import PolicyError, PolicyWatcher, load_policy
from support import POLICIES

GOOD = """\
categories:
  webmail:
    action: block
    reason: {en: "No webmail.", zh: "禁止网页邮箱。"}
    rules:
      - id: webmail.qq
        hosts: [mail.qq.com]
"""


def problems(directory):
    with pytest.raises(PolicyError) as err:
        load_policy(directory)
    return err.value.problems


def test_shipped_policy_loads_and_covers_the_services_people_use():
    policy = load_policy(POLICIES)
    assert policy.stats["webmail"].rules >= 25
    assert policy.stats["cloud_drive"].rules >= 30
    assert policy.retention_months >= 6
    blocked = {
        "mail.qq.com": "/",
        "mail.163.com": "/",
        "mail.126.com": "/",
        "mail.google.com": "/",
        "outlook.live.com": "/mail/0/",
        "mail.proton.me": "/",
        "pan.baidu.com": "/disk/home",
        "www.aliyundrive.com": "/",
        "pan.quark.cn": "/",
        "www.123pan.com": "/",
        "wwi.lanzoui.com": "/",
        "www.weiyun.com": "/",
        "drive.google.com": "/",
        "onedrive.live.com": "/",
        "mega.nz": "/",
        "www.dropbox.com": "/",
        "www.icloud.com": "/mail/",
        "wetransfer.com": "/",
    }
    for host, path in blocked.items():
        d = decide(RequestFacts((host,), path), policy)
        assert d.verdict == "block", f"{host}{path} not blocked"
    for host in (
        "www.qq.com",
        "www.baidu.com",
        "www.google.com",
        "www.163.com",
        "news.sina.com.cn",
    ):
        assert decide(RequestFacts((host,), "/"), policy).verdict == "allow", host
    assert decide(RequestFacts(("www.icloud.com",), "/photos/"), policy).verdict == "allow"
    assert needs_interception(("www.icloud.com",), policy)


def test_decision_checks_every_name_the_request_carries():
    policy = load_policy(POLICIES)
    # A Host header naming a blocked site behind an innocent connection target still blocks.
    d = decide(RequestFacts(("www.example.org", "mail.qq.com"), "/"), policy)
    assert d.verdict == "block" and d.host == "mail.qq.com"


def test_yaml_syntax_error_names_file_and_line(write_policy):
    d = write_policy({"a.yaml": GOOD + "  broken: [unclosed\n"})
    (msg,) = problems(d)
    assert msg.startswith(f"{d / 'a.yaml'}:")
    assert "(syntax)" in msg


@pytest.mark.parametrize(
    ("line_text", "replacement", "line", "field", "words"),
    [
        (
            "hosts: [mail.qq.com]",
            "hosts: [https://mail.qq.com]",
            7,
            "categories.webmail.rules[0].hosts[0]",
            "scheme",
        ),
        (
            "hosts: [mail.qq.com]",
            "hosts: [mail.qq.com]\n        color: red",
            8,
            "categories.webmail.rules[0].color",
            "Extra inputs",
        ),
        ("action: block", "action: deny", 3, "categories.webmail.action", "block"),
        ("- id: webmail.qq", "- id: Webmail QQ", 6, "categories.webmail.rules[0].id", "pattern"),
        (
            "hosts: [mail.qq.com]",
            "paths: [/x]",
            6,
            "categories.webmail.rules[0]",
            "at least one entry",
        ),
    ],
)
def test_field_errors_name_file_line_and_field(
    write_policy, line_text, replacement, line, field, words
):
    d = write_policy({"webmail.yaml": GOOD.replace(line_text, replacement)})
    msgs = problems(d)
    expected = f"{d / 'webmail.yaml'}:{line}: {field}:"
    assert any(m.startswith(expected) and words in m for m in msgs), msgs


def test_retention_below_six_months_is_refused(write_policy):
    d = write_policy({"webmail.yaml": GOOD, "gateway.yaml": "settings:\n  retention_months: 3\n"})
    (msg,) = problems(d)
    assert msg.startswith(f"{d / 'gateway.yaml'}:2: settings:")
    assert "below the required minimum of 6 months" in msg


def test_duplicate_rule_ids_across_files_name_both_places(write_policy):
    other = (
        "categories:\n  cloud_drive:\n    rules:\n      - id: webmail.qq\n        hosts: [x.com]\n"
    )
    d = write_policy({"a.yaml": GOOD, "b.yaml": other})
    (msg,) = problems(d)
    assert msg.startswith(f"{d / 'b.yaml'}:4:")
    assert f"first defined in {d / 'a.yaml'}:6" in msg


def test_a_category_may_span_files_but_not_disagree(write_policy):
    extra = (
        "categories:\n  webmail:\n    rules:\n      - id: webmail.extra\n        hosts: [x.com]\n"
    )
    policy = load_policy(write_policy({"a.yaml": GOOD, "b.yaml": extra}))
    assert policy.stats["webmail"].rules == 2
    assert decide(RequestFacts(("x.com",), "/"), policy).rule.reason.en == "No webmail."
    conflict = "categories:\n  webmail:\n    action: allow\n"
    d = write_policy({"c.yaml": conflict})
    assert any("conflicts with 'block'" in m for m in problems(d))


def test_every_problem_is_reported_at_once(write_policy):
    d = write_policy(
        {
            "a.yaml": GOOD.replace("mail.qq.com", "*.qq.com"),
            "b.yaml": "settings:\n  retention_months: 1\n",
        }
    )
    assert len(problems(d)) == 2


def test_watcher_keeps_last_good_policy_on_invalid_reload(write_policy):
    d = write_policy({"webmail.yaml": GOOD})
    watcher = PolicyWatcher(d, load_policy(d))
    assert watcher.check() == "unchanged"

    path = d / "webmail.yaml"
    path.write_text(GOOD.replace("hosts: [mail.qq.com]", "hosts: [mail.qq.com, mail.126.com]"))
    os.utime(path, ns=(1, 1))  # a distinct mtime without waiting for the clock
    assert watcher.check() == "reloaded"
    assert decide(RequestFacts(("mail.126.com",), "/"), watcher.policy).verdict == "block"

    path.write_text("categories: {webmail: {rules: [{id: BAD}]}}\n")
    os.utime(path, ns=(2, 2))
    assert watcher.check() == "invalid"
    assert "rules[0].id" in str(watcher.last_error)
    assert decide(RequestFacts(("mail.126.com",), "/"), watcher.policy).verdict == "block"


DESTINATIONS = """\
destinations:
  allow_internal:
    - 10.20.0.0/16
    - {network: 192.168.5.10/32, ports: [443, 8443]}
    - fd00:20::/64
"""


def test_destinations_allow_list_loads_with_where_each_entry_came_from(write_policy):
    d = write_policy({"webmail.yaml": GOOD, "gateway.yaml": DESTINATIONS})
    rules = load_policy(d).destinations
    assert [str(e.network) for e in rules.allow_internal] == [
        "10.20.0.0/16",
        "192.168.5.10/32",
        "fd00:20::/64",
    ]
    assert rules.allow_internal[1].ports == {443, 8443} and not rules.allow_internal[0].ports
    assert rules.allow_internal[1].source == f"{d / 'gateway.yaml'}:4"
    own = OwnSockets()
    assert check_destination(["10.20.1.1"], 22, own, rules) is None
    assert check_destination(["192.168.5.10"], 8443, own, rules) is None
    assert check_destination(["192.168.5.10"], 80, own, rules) is not None
    assert check_destination(["10.21.1.1"], 443, own, rules) is not None


def test_without_a_destinations_section_nothing_internal_is_allowed(write_policy):
    assert load_policy(write_policy({"webmail.yaml": GOOD})).destinations == DestinationRules()
    assert load_policy(POLICIES).destinations == DestinationRules()  # shipped: an empty list


@pytest.mark.parametrize(
    ("line_text", "replacement", "line", "field", "words"),
    [
        ("10.20.0.0/16", "10.20.0.0/33", 3, "destinations.allow_internal[0].network", "not a"),
        ("10.20.0.0/16", "10.20.0.1/16", 3, "destinations.allow_internal[0].network", "host bits"),
        ("10.20.0.0/16", "intranet", 3, "destinations.allow_internal[0].network", "not a network"),
        ("[443, 8443]", "[443, 70000]", 4, "destinations.allow_internal[1].ports[1]", "not a port"),
        ("[443, 8443]", "[https]", 4, "destinations.allow_internal[1].ports[0]", "not a port"),
        ("[443, 8443]", "[]", 4, "destinations.allow_internal[1]", "'ports' is empty"),
        ("ports:", "port:", 4, "destinations.allow_internal[1].port", "Extra inputs"),
        ("fd00:20::/64", "0.0.0.0/0", 5, "destinations.allow_internal[2]", "never forwards"),
        # an unknown key with a list is reported at the list, as in the other sections
        ("allow_internal:", "allow_external:", 3, "destinations.allow_external", "Extra inputs"),
    ],
)
def test_destination_errors_name_file_line_and_field(
    write_policy, line_text, replacement, line, field, words
):
    d = write_policy(
        {"webmail.yaml": GOOD, "gateway.yaml": DESTINATIONS.replace(line_text, replacement)}
    )
    msgs = problems(d)
    expected = f"{d / 'gateway.yaml'}:{line}: {field}:"
    assert any(m.startswith(expected) and words in m for m in msgs), msgs


def test_destinations_may_be_given_in_one_file_only(write_policy):
    d = write_policy({"a.yaml": GOOD + DESTINATIONS, "b.yaml": DESTINATIONS})
    (msg,) = problems(d)
    assert msg.startswith(f"{d / 'b.yaml'}:2: destinations: already given in {d / 'a.yaml'}:9")


def test_the_default_policy_is_the_shipped_one():
    """`egress-guard run` without --policies loads ./policies of the checkout (or the copy
    packaged in the wheel)."""
    from egress_guard.core.policy import default_policy_dir

    assert default_policy_dir().resolve() == POLICIES.resolve()
    assert load_policy(default_policy_dir()).stats["webmail"].rules > 10


NOTIFY = """\
categories: {{}}
notifications:
  smtp:
    host: mail.corp.example
    from: egress-guard@corp.example
    username: egress-guard
    password_file: {password}
  approvers: {{email: [security@corp.example]}}
"""


def test_notifications_read_their_secrets_when_the_policy_loads(tmp_path):
    (tmp_path / "notify.yaml").write_text(NOTIFY.format(password="smtp-password"))
    (tmp_path / "smtp-password").write_text("s3cret\n")  # relative: from the policy directory
    policy = load_policy(tmp_path)
    assert policy.notifications is not None
    assert policy.notifications.approvers.email == ("security@corp.example",)
    assert policy.notify_credentials.smtp_password == "s3cret"
    assert "s3cret" not in repr(policy)  # never printed by accident


def test_a_notification_secret_that_cannot_be_read_names_file_and_line(tmp_path):
    (tmp_path / "notify.yaml").write_text(NOTIFY.format(password="missing-file"))
    (problem,) = problems(tmp_path)
    assert problem.startswith(f"{tmp_path / 'notify.yaml'}:7: notifications:")  # the field
    assert "smtp.password_file" in problem and "cannot be read" in problem


def test_a_notification_field_out_of_its_choices_is_refused_with_its_line(tmp_path):
    text = NOTIFY.format(password="p").replace(
        "  approvers:", "  webhook: {kind: teams, url: x}\n  approvers:"
    )
    (tmp_path / "notify.yaml").write_text(text)
    found = problems(tmp_path)
    assert any("notify.yaml:" in p and "notifications.webhook.kind" in p for p in found), found
