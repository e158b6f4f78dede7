"""`lamsonfilter check --postfix-config` in queue mode: the shipped conf/postfix/main.cf.queue (PF301-PF306).

Every configuration is read by the real ``postconf`` and ``postmap`` from a scratch directory.
"""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from lamsonfilter.check.postfix import check_postfix
from tests.rig.checks import ROOT, need_postconf, write_postfix

SETTINGS = {"HOSTS": ["lists.example.org"], "RELAY": "127.0.0.1:10026"}
SHIPPED_MAIN = (ROOT / "conf" / "postfix" / "main.cf.queue").read_text()
NOBODY = pwd.getpwnam("nobody")
#: the shipped lines with the owner filled in, as README.rst's postconf -e line does
FILLED_MAIN = SHIPPED_MAIN.replace("LAMSONFILTER_UID", str(NOBODY.pw_uid)).replace("LAMSONFILTER_GID", str(NOBODY.pw_gid))
MASTER = ("smtp      inet  n       -       y       -       -       smtpd\n"
          "virtual   unix  -       n       n       -       -       virtual\n"
          + (ROOT / "conf" / "postfix" / "master.cf.queue").read_text())


def found(pf: Path, user: str | None = None) -> list[str]:
    return sorted(f.id for f in check_postfix(pf, SETTINGS, user=user))


@pytest.fixture(autouse=True)
def _postconf():
    need_postconf()


def test_the_shipped_lines_with_the_owner_filled_in_have_no_findings(tmp_path):
    assert found(write_postfix(tmp_path / "pf", FILLED_MAIN, MASTER), user="nobody") == []


def test_the_shipped_placeholders_left_in_are_an_error(tmp_path):
    """LAMSONFILTER_UID is no number: virtual(8) would defer every message ("bad uid")."""
    findings = check_postfix(write_postfix(tmp_path / "pf", SHIPPED_MAIN, MASTER), SETTINGS)
    assert sorted(f.id for f in findings) == ["PF303", "PF303"]
    assert all(f.severity == "error" and "LAMSONFILTER_" in f.message for f in findings)
    assert "id -u lamsonfilter" in findings[0].fix


def test_a_uid_below_virtual_minimum_uid(tmp_path):
    main = FILLED_MAIN.replace(f"static:{NOBODY.pw_uid}", "static:0")
    assert found(write_postfix(tmp_path / "pf", main, MASTER)) == ["PF303"]


def test_the_queue_owner_is_not_the_user_of_the_daemons(tmp_path):
    pf = write_postfix(tmp_path / "pf", FILLED_MAIN, MASTER)
    assert found(pf, user="root") == ["PF304"]
    assert found(pf, user="nobody") == []


def test_the_domain_also_in_relay_domains(tmp_path):
    """The main.cf.domains lines of the other modes left in: two address classes, and transport_maps
    sends the domain to lamsonfilter-kept instead of virtual(8)."""
    domains = (ROOT / "conf" / "postfix" / "main.cf.domains").read_text()
    main = FILLED_MAIN + domains.replace("defer_transports = lamsonfilter-kept", "")
    assert found(write_postfix(tmp_path / "pf", main, MASTER)) == ["PF301", "PF305"]


def test_a_mailbox_file_instead_of_a_maildir(tmp_path):
    main = FILLED_MAIN.replace("= queue/}", "= queue}")
    assert found(write_postfix(tmp_path / "pf", main, MASTER)) == ["PF302"]


def test_no_virtual_service_in_master_cf(tmp_path):
    master = MASTER.replace("virtual   unix  -       n       n       -       -       virtual\n", "")
    assert found(write_postfix(tmp_path / "pf", FILLED_MAIN, master)) == ["PF305"]


def test_an_outbox_listener_that_does_not_hold_mail_for_the_own_domains(tmp_path):
    """The milter's listener (master.cf.milter) used in queue mode: deq's mail to itself would loop."""
    master = MASTER.replace("check_recipient_access,$lamsonfilter_own_domains,", "")
    findings = check_postfix(write_postfix(tmp_path / "pf", FILLED_MAIN, master), SETTINGS)
    assert [(f.id, f.severity) for f in findings] == [("PF306", "warning")]
    assert "lists.example.org" in findings[0].message


def test_without_the_queue_lines_postfix_sends_nothing_to_lamsonfilter(tmp_path):
    assert "PF002" in found(write_postfix(tmp_path / "pf", "relay_domains = lists.example.org\n", MASTER))


def test_without_the_policy_check_unknown_addresses_are_accepted_and_it_says_so(tmp_path):
    """PF307: without check_policy_service, Postfix accepts every address of the domain; deq can only
    quarantine mail to an address no route takes, later."""
    main = "\n".join(line for line in FILLED_MAIN.splitlines() if not line.startswith("smtpd_recipient_restrictions"))
    findings = check_postfix(write_postfix(tmp_path / "pf", main, MASTER), SETTINGS, user="nobody")
    assert [(f.id, f.severity) for f in findings] == [("PF307", "warning")]
    assert "quarantined by deq" in findings[0].message and "deq --policy" in findings[0].fix


def test_no_outbox_listener_names_the_queue_modes_master_cf(tmp_path):
    """PF110 in queue mode points at master.cf.queue (its listener holds mail for the own domains),
    not at the content filter's file."""
    master = MASTER.split("127.0.0.1:10026")[0]
    findings = check_postfix(write_postfix(tmp_path / "pf", FILLED_MAIN, master), SETTINGS, user="nobody")
    [pf110] = [f for f in findings if f.id == "PF110"]
    assert "conf/postfix/master.cf.queue" in pf110.fix and "content_filter" not in pf110.fix


def test_a_queue_directory_virtual_cannot_write_is_pf308(tmp_path):
    """deq run once as another user (root) before the first delivery creates queue/ as that user:
    virtual(8), writing as virtual_uid_maps, then defers every message ('Permission denied')."""
    import os

    base = tmp_path / "spool"
    (base / "queue" / "new").mkdir(parents=True)  # made by this process, not by the queue's owner
    main = FILLED_MAIN.replace("virtual_mailbox_base = /var/spool/lamsonfilter", f"virtual_mailbox_base = {base}")
    findings = check_postfix(write_postfix(tmp_path / "pf", main, MASTER), SETTINGS)
    assert [f.id for f in findings] == ["PF308"]
    assert f"{base / 'queue'} (owner" in findings[0].message and "Permission denied" in findings[0].message
    assert f"chown -R {NOBODY.pw_uid}:{NOBODY.pw_gid} {base / 'queue'}" in findings[0].fix
    # the same directory, with virtual(8) writing as its owner: nothing to say
    me = (f"virtual_uid_maps = static:{os.getuid()}\nvirtual_gid_maps = static:{os.getgid()}\n"
          "virtual_minimum_uid = 0\n")
    main = "\n".join(line for line in main.splitlines()
                     if not line.startswith(("virtual_uid_maps", "virtual_gid_maps", "virtual_minimum_uid"))) + "\n" + me
    assert check_postfix(write_postfix(tmp_path / "pf2", main, MASTER), SETTINGS) == []
