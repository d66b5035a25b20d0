"""The retry policy of requests to other hosts (``_mesh._across.Retry``), which both the
caller-thread driver (``send_request``) and the callback driver (``request``) follow."""

from __future__ import annotations

from typing import Any, cast

from mpmesh import RequestTimeout, WorkerLost
from mpmesh._mesh._across import Across, Retry


class FakeAcross:
    """What a ``Retry`` uses of its ``Across``."""

    def __init__(self, hosts: list[int | None]) -> None:
        self.hosts = hosts
        self.events: list[tuple[str, Any]] = []
        self.is_closed = False

    def closed(self) -> bool:
        return self.is_closed

    def emit(self, event: str, info: Any) -> None:
        self.events.append((event, info))

    def other_host(self, target: str | int) -> int | None:
        return self.hosts.pop(0)


def policy(fake: FakeAcross, retries: int = 2, retry_on: tuple[type[BaseException], ...] = ()) -> Retry:
    return Retry(cast(Across, fake), "sq", "api", timeout=1.0, priority=3, retries=retries,
                 retry_delay=0.25, retry_on=retry_on)


def test_lost_and_timed_out_requests_retry_until_the_budget_is_spent() -> None:
    fake = FakeAcross([])
    retry = policy(fake)
    assert retry.after(WorkerLost("gone")) == 0.25
    assert retry.after(RequestTimeout("slow")) == 0.25
    assert retry.after(WorkerLost("gone")) is None
    assert [(e, i["attempt"], i["attempts"]) for e, i in fake.events] == [("request-retry", 2, 3),
                                                                           ("request-retry", 3, 3)]


def test_other_errors_give_up_at_once_unless_retry_on_names_them() -> None:
    fake = FakeAcross([])
    assert policy(fake).after(ValueError("bad")) is None
    assert fake.events == []
    assert policy(fake, retry_on=(ValueError,)).after(ValueError("bad")) == 0.25


def test_a_closed_master_retries_nothing() -> None:
    fake = FakeAcross([])
    fake.is_closed = True
    assert policy(fake).after(WorkerLost("gone")) is None


def test_the_next_attempt_goes_where_the_target_is_served_with_the_retries_left() -> None:
    fake = FakeAcross([7, None])
    retry = policy(fake, retries=3)
    retry.after(WorkerLost("gone"))
    assert retry.next_host() == 7
    assert retry.next_host() is None  # this host serves it now
    assert retry.here() == {"timeout": 1.0, "priority": 3, "retries": 2, "retry_delay": 0.25}
