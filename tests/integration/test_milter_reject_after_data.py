"""Milter mode, through a real Postfix: a recipient the application rejects after DATA among delivered ones.

After DATA a milter cannot refuse one recipient of several, so the milter
plan removes the rejected one with ``delrcpt`` (lamsonfilter/milterparts/plan.py);
without it Postfix would deliver the message to the address the
application refused.  The unit test of the plan is in tests/test_plans.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rig.deploy import LIST_HOST
from tests.rig.deploy_milter import MilterDeployment, require_pymilter
from tests.rig.modes import started

pytestmark = pytest.mark.postfix



class ClosedAddressDeployment(MilterDeployment):
    """The usual milter deployment plus the ``closed@`` route (tests/fixtures/handlers/lfclosed.py)."""

    extra_handlers = ("lfclosed",)


@pytest.fixture
def deployment() -> Iterator[ClosedAddressDeployment]:
    require_pymilter()
    with started(ClosedAddressDeployment()) as dep:
        yield dep


def test_a_recipient_rejected_after_data_is_not_delivered_while_the_other_is(
    deployment: ClosedAddressDeployment,
) -> None:
    tag, closed = f"tag@{LIST_HOST}", f"closed@{LIST_HOST}"
    result = deployment.send("alice@example.com", [tag, closed], "one refused, one delivered")
    assert result.rcpt(closed) is not None and result.rcpt(closed).code == 250, str(result)  # routed: taken at RCPT
    deployment.assert_accepted(result)  # the other recipient still gets it
    [delivered] = deployment.wait_for_mail(tag, "one refused")
    assert [r.lower() for r in delivered.rcpt_tos] == [tag]
    deployment.settle()
    assert deployment.messages_to(closed) == []
