"""The daemon's admission tables, against simple models."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mmdf_smtp.admission import Admission, SessionCounts, client_keys
from mmdf_smtp.config import SmtpdConfig
from mmdf_smtp.protocol import replies

SESSIONS = 6
keys = st.tuples(st.integers(0, 3), st.integers(0, 20))  # few keys: many collisions


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), keys, st.integers(0, 3)), max_size=80))
def test_session_counts_agree_with_a_dictionary(
    steps: list[tuple[bool, tuple[int, int], int]],
) -> None:
    table = SessionCounts(SESSIONS)
    model: dict[tuple[int, int], int] = {}
    for opening, key, limit in steps:
        if opening:
            if sum(model.values()) == SESSIONS:
                continue  # no more sessions than the daemon serves
            allowed = not limit or model.get(key, 0) < limit
            assert table.acquire(key, limit) == allowed
            if allowed:
                model[key] = model.get(key, 0) + 1
        elif model.get(key):
            table.release(key)
            model[key] -= 1
        # Every key is still found after the shifts deletion makes.
        for known, count in model.items():
            assert table.acquire(known, count) is (count == 0)
            if count == 0:
                table.release(known)


def test_networks_are_slash_24_and_slash_64() -> None:
    assert client_keys("192.0.2.7")[1] == client_keys("192.0.2.200")[1]
    assert client_keys("192.0.2.7")[1] != client_keys("192.0.3.7")[1]
    assert client_keys("2001:db8::1")[1] == client_keys("2001:db8::ffff:1")[1]
    assert client_keys("2001:db8:0:1::1")[1] != client_keys("2001:db8::1")[1]
    assert client_keys("::ffff:192.0.2.7") == client_keys("192.0.2.7")


def test_rates_start_again_each_minute() -> None:
    now = [1000.0]
    admission = Admission(4, clock=lambda: now[0])
    limits = SmtpdConfig(rate_per_client=2)
    first = admission.admit("192.0.2.7", limits)
    assert not isinstance(first, replies.Reply)
    admission.release(first)
    second = admission.admit("192.0.2.7", limits)
    assert not isinstance(second, replies.Reply)
    admission.release(second)
    assert admission.admit("192.0.2.7", limits) is replies.CLIENT_CONNECTION_RATE
    now[0] += 59.0
    assert admission.admit("192.0.2.7", limits) is replies.CLIENT_CONNECTION_RATE
    now[0] += 1.0
    assert not isinstance(admission.admit("192.0.2.7", limits), replies.Reply)
