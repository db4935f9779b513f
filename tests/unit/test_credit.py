"""A shard's credit window, driven directly (the router's use of it is in test_router.py)."""

from hypothesis import given
from hypothesis import strategies as st

from actors.credit import MARK_SPAN, CreditWindow, WindowLimits
from actors.wire import shardwire

LIMITS = WindowLimits(messages=100, size=10_000, delay=0.1)


def test_in_flight_is_what_was_queued_less_what_was_consumed():
    window = CreditWindow()
    for _ in range(3):
        window.queued(10, now=0.0)
    assert window.in_flight() == (3, 30)
    window.credit(2, 20)
    assert window.in_flight() == (1, 10)


def test_stale_or_excessive_credit_cannot_open_the_window():
    window = CreditWindow()
    window.queued(10, now=0.0)
    window.credit(5, 500)  # more than was sent
    assert window.in_flight() == (0, 0)
    window.queued(10, now=0.0)
    window.credit(0, 0)  # an old report, overtaken
    assert window.in_flight() == (1, 10)


def test_the_backlog_is_dated_by_its_oldest_unconsumed_message():
    window = CreditWindow()
    window.queued(1, now=1.0)
    window.queued(1, now=1.0 + MARK_SPAN / 2)  # same mark
    window.queued(1, now=2.0)
    assert window.backlog_age(now=2.5) == 1.5
    window.credit(2, 2)
    assert window.backlog_age(now=2.5) == 0.5
    window.credit(3, 3)
    assert window.backlog_age(now=2.5) == 0.0


def test_refusals_name_the_limit_that_was_hit():
    window = CreditWindow()
    assert window.refusal(20_000, 0.0, LIMITS) is not None  # bigger than the byte window
    for _ in range(100):
        window.queued(1, now=0.0)
    assert "100 deliveries queued" in (window.refusal(1, 0.0, LIMITS) or "")


def test_a_few_messages_in_flight_are_never_behind():
    window = CreditWindow()
    for _ in range(shardwire.CREDIT_MESSAGES):
        window.queued(1, now=0.0)
    assert window.refusal(1, 10.0, LIMITS) is None
    window.queued(1, now=0.0)
    assert "behind" in (window.refusal(1, 10.0, LIMITS) or "")


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 500)), max_size=200))
def test_in_flight_never_goes_negative_nor_above_what_was_sent(steps):
    window, sent, consumed = CreditWindow(), 0, 0
    for is_send, size in steps:
        if is_send:
            window.queued(size, now=0.0)
            sent += 1
        else:
            consumed = min(sent, consumed + 1)
            window.credit(consumed, 10**9)
        messages, _size = window.in_flight()
        assert 0 <= messages <= sent


def test_messages_that_never_left_are_taken_back_out_of_the_window():
    window = CreditWindow()
    window.queued(10, now=1.0)
    window.queued(10, now=2.0)
    window.queued(10, now=2.0 + MARK_SPAN / 2)
    window.dropped(2, 20)  # the last two were never sent
    assert window.in_flight() == (1, 10)
    assert window.backlog_age(now=5.0) == 4.0  # dated by the one still in flight
    window.credit(1, 10)
    assert window.in_flight() == (0, 0)
    assert window.backlog_age(now=5.0) == 0.0
    window.queued(10, now=6.0)  # and the window goes on counting from there
    assert window.in_flight() == (1, 10)


def test_dropping_everything_in_flight_leaves_no_backlog():
    window = CreditWindow()
    for i in range(100):
        window.queued(1, now=float(i))
    window.dropped(100, 100)
    assert window.in_flight() == (0, 0)
    assert window.backlog_age(now=1000.0) == 0.0
    assert window.refusal(1, 1000.0, LIMITS) is None


def test_a_shard_keeping_up_between_its_credit_reports_is_never_behind():
    """500 messages/s to a shard that consumes each at once but, as shards do, reports only
    every CREDIT_MESSAGES messages, the report reaching the router 10 ms late (a batch window):
    128 ms between reports, more than the 0.1 s delay, and still nothing is refused. Then the
    shard stops: refused once the message it would have reported has waited 0.1 s."""
    limits = WindowLimits(messages=20_000, size=10**9, delay=0.1)
    window, reported, refusals = CreditWindow(), 0, []
    pending: list[tuple[float, int]] = []  # (when the router reads it, consumed total)
    now = 0.0
    for n in range(1, 2001):  # 4 s
        now = n * 0.002
        while pending and pending[0][0] <= now:
            window.credit(pending.pop(0)[1], 10**9)
        refusals.append(window.refusal(100, now, limits))
        window.queued(100, now)
        if n - reported >= shardwire.CREDIT_MESSAGES:  # consumed at once
            reported = n
            pending.append((now + 0.01, n))
    assert refusals == [None] * 2000
    while pending:
        window.credit(pending.pop(0)[1], 10**9)
    stopped = now
    while window.refusal(100, now, limits) is None:  # the shard consumes nothing more
        assert now < stopped + 1.0, "a stopped shard was never refused"
        now += 0.002
        window.queued(100, now)
    # the last report was at 1,984: the 2,048th message, sent 96 ms after the stop, is the
    # one it would have reported; behind once that has waited 0.1 s (dated by its mark)
    assert 0.096 + 0.1 - MARK_SPAN <= now - stopped <= 0.096 + 0.1 + 0.004
    assert "behind" in (window.refusal(100, now, limits) or "")


def test_the_overdue_message_is_found_by_bytes_too():
    window = CreditWindow()
    big = shardwire.CREDIT_BYTES // 4
    for i in range(6):  # few messages, many bytes: the 4th crosses the report threshold
        window.queued(big, now=float(i))
    assert window.overdue_age(now=10.0) == 10.0 - 3.0
    window.credit(2, 2 * big)
    assert window.overdue_age(now=10.0) == 10.0 - 5.0
