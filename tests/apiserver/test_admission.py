"""Admission decides from counters alone, before a body is read."""

from __future__ import annotations

import pytest

from apiserver.admission import Admission
from apiserver.errors import ApiError


def test_each_limit_gives_429_with_retry_after() -> None:
    state = {"waiting": 0, "full": False}
    adm = Admission(2, 3, lambda: state["waiting"], lambda: state["full"])
    adm.enter()
    adm.enter()
    with pytest.raises(ApiError) as exc:
        adm.enter()
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "1"
    adm.leave()
    state["waiting"] = 3
    with pytest.raises(ApiError, match="engine queue"):
        adm.enter()
    state["waiting"], state["full"] = 0, True
    with pytest.raises(ApiError, match="preprocessing"):
        adm.enter()
    state["full"] = False
    adm.enter()
    assert adm.inflight == 2


def test_check_refuses_without_counting() -> None:
    adm = Admission(1, 3, lambda: 0, lambda: False)
    adm.check()
    assert adm.inflight == 0
    adm.enter()
    with pytest.raises(ApiError, match="in flight"):
        adm.check()
