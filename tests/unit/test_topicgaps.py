"""actors.topicgaps: the gaps in a channel's topic and their repair, driven delivery by delivery."""

from __future__ import annotations

import json

from actors.history import Recovery
from actors.hostlink import Delivery
from actors.ids import ChannelId
from actors.topicgaps import HELD_COST, Fill, TopicGaps
from actors.wire import frames

C = ChannelId(5)
KEEPS = 64  # the history's size


def message(offset: int, epoch: str = "E", channel: ChannelId = C) -> Delivery:
    frame = frames.channel_message(channel, json.dumps(offset).encode(), offset, epoch)
    return Delivery(channel, [], frame, offset=offset, epoch=epoch)


def probe(qid: int) -> Delivery:
    return Delivery(C, [], b"", {"op": "probe_back", "qid": qid})


def offsets(deliveries: list[Delivery]) -> list[int]:
    return [d.offset for d in deliveries]


def kept(first: int, last: int, epoch: str = "E") -> Recovery:
    """What a read answers when the history holds ``first..last`` in ``epoch`` and ``first`` is
    the gap's first message (recovered: it was still kept)."""
    messages = [(o, json.dumps(o).encode()) for o in range(first, last + 1)]
    return Recovery(True, last, epoch, messages)


def feed(gaps: TopicGaps, *deliveries: Delivery) -> tuple[list[Delivery], list[Fill]]:
    out, fills = [], []
    for delivery in deliveries:
        ready, fill = gaps.arrive(delivery, KEEPS)
        out += ready
        if fill is not None:
            fills.append(fill)
    return out, fills


def test_a_topic_without_gaps_goes_straight_through():
    gaps = TopicGaps()
    out, fills = feed(gaps, message(1), message(2), message(3))
    assert offsets(out) == [1, 2, 3] and fills == []
    assert gaps.counters["gaps"] == 0 and gaps.statistics()["channels"] == 1


def test_a_gap_is_read_and_delivered_before_what_follows_in_order():
    gaps = TopicGaps()
    feed(gaps, message(1), message(2))
    out, fills = feed(gaps, message(6), message(7))  # 3, 4, 5 were not heard
    assert out == [] and fills == [Fill(C, 2, 3, "E", fills[0].token)]  # 3 after 2
    # were the read to hold more than the gap: 6 and 7 come from the topic, 8 will
    ready, again = gaps.filled(C, fills[0].token, kept(3, 8))
    # the read's in the frames the topic would have brought (offset, epoch, data)
    assert ready == [message(o) for o in (3, 4, 5, 6, 7)] and again is None
    assert offsets(feed(gaps, message(8))[0]) == [8]
    assert gaps.statistics() == {
        "gaps": 1,
        "gaps_filled": 1,
        "gaps_unfilled": 0,
        "gap_messages": 3,
        "channels": 1,
        "repairing": 0,
        "held_bytes": 0,
    }


def test_a_failed_read_lets_the_held_messages_go_on_with_the_gap():
    gaps = TopicGaps()
    feed(gaps, message(1))
    _, (fill,) = feed(gaps, message(4), message(5))
    ready, again = gaps.filled(C, fill.token, None)
    assert offsets(ready) == [4, 5] and again is None
    assert gaps.counters["gaps_unfilled"] == 1
    assert feed(gaps, message(6)) == ([message(6)], [])  # no new gap: 4 and 5 went on


def test_a_gap_the_history_no_longer_holds_is_left_as_it_is():
    gaps = TopicGaps()
    feed(gaps, message(1))
    _, (fill,) = feed(gaps, message(10))
    trimmed = Recovery(False, 10, "E", [])  # the read found 2 gone: not recovered
    assert gaps.filled(C, fill.token, trimmed) == ([message(10)], None)
    _, (fill,) = feed(gaps, message(20))
    # the channel's state expired and started again meanwhile: another epoch's offsets
    assert gaps.filled(C, fill.token, kept(1, 25, epoch="F")) == ([message(20)], None)
    assert gaps.counters["gaps_unfilled"] == 2 and gaps.counters["gap_messages"] == 0


def test_a_read_that_holds_only_part_of_the_gap_delivers_that_part_and_says_unfilled():
    gaps = TopicGaps()
    feed(gaps, message(1))
    _, (fill,) = feed(gaps, message(5))
    # a failover lost 3 and 4 (replication is asynchronous): the history says 2 is the last
    ready, _ = gaps.filled(C, fill.token, kept(2, 2))
    assert offsets(ready) == [2, 5]
    assert gaps.counters["gaps_unfilled"] == 1 and gaps.counters["gap_messages"] == 1


def test_a_gap_longer_than_the_history_keeps_is_not_read():
    gaps = TopicGaps()
    feed(gaps, message(1))
    # KEEPS missing: when the one after them was kept, the first of them was trimmed
    ready, fill = gaps.arrive(message(1 + KEEPS + 1), KEEPS)
    assert offsets(ready) == [KEEPS + 2] and fill is None
    assert gaps.counters == gaps.counters | {"gaps": 1, "gaps_unfilled": 1}
    ready, fill = gaps.arrive(message(KEEPS + 2 + KEEPS), KEEPS)  # KEEPS - 1 missing: kept
    assert ready == [] and fill == Fill(C, KEEPS + 2, KEEPS - 1, "E", fill.token)


def test_a_new_epoch_a_repeat_and_an_older_offset_are_not_gaps():
    gaps = TopicGaps()
    feed(gaps, message(7))
    out, fills = feed(gaps, message(1, epoch="F"), message(1, epoch="F"), message(2, epoch="F"))
    assert offsets(out) == [1, 1, 2] and fills == []
    out, fills = feed(gaps, message(1, epoch="F"), message(3, epoch="F"))  # 1: no step back
    assert offsets(out) == [1, 3] and fills == []


def test_messages_without_offsets_and_other_channels_pass_and_probes_wait_their_turn():
    gaps = TopicGaps()
    plain = Delivery(C, [], frames.channel_message(C, b"0"))
    other = ChannelId(6)
    out, fills = feed(gaps, plain, message(1), message(9, channel=other))
    assert out == [plain, message(1), message(9, channel=other)] and fills == []
    _, (fill,) = feed(gaps, message(3))
    # a probe after 3 on the topic: a resume from nothing waits for it, after 3's delivery
    assert feed(gaps, probe(77), message(2, channel=other)) == ([message(2, channel=other)], [])
    ready, _ = gaps.filled(C, fill.token, kept(2, 3))
    assert ready == [message(2), message(3), probe(77)]


def test_a_second_gap_among_the_held_messages_is_read_in_turn():
    gaps = TopicGaps()
    feed(gaps, message(1))
    _, (first,) = feed(gaps, message(3), message(4), message(7), message(8))
    ready, second = gaps.filled(C, first.token, kept(2, 4))
    assert offsets(ready) == [2, 3, 4]
    assert second == Fill(C, 4, 2, "E", second.token) and second.token != first.token
    assert feed(gaps, message(9)) == ([], [])  # behind the second read
    ready, again = gaps.filled(C, second.token, kept(5, 9))
    assert offsets(ready) == [5, 6, 7, 8, 9] and again is None
    assert gaps.counters["gaps_filled"] == 2 and gaps.statistics()["held_bytes"] == 0


def test_too_much_held_ends_the_repair_and_a_late_answer_is_ignored():
    gaps = TopicGaps(max_held=3)
    feed(gaps, message(1))
    _, (fill,) = feed(gaps, message(3), message(4), message(5))
    out, fills = feed(gaps, message(6))  # the fourth: over max_held
    assert offsets(out) == [3, 4, 5, 6] and fills == []
    assert gaps.counters["gaps_unfilled"] == 1 and gaps.statistics()["repairing"] == 0
    assert gaps.filled(C, fill.token, kept(2, 6)) == ([], None)
    assert feed(gaps, message(7)) == ([message(7)], [])


def test_the_bytes_held_are_bounded_over_all_channels():
    size = len(message(3).frame) + HELD_COST
    gaps = TopicGaps(max_held_bytes=3 * size)
    other = ChannelId(6)
    feed(gaps, message(1), message(1, channel=other))
    _, (fill_c,) = feed(gaps, message(3), message(4))
    _, (fill_o,) = feed(gaps, message(3, channel=other))
    assert gaps.statistics()["held_bytes"] == 3 * size
    out, _ = feed(gaps, message(4, channel=other))  # a fourth, on either channel: too much
    assert offsets(out) == [3, 4]
    assert gaps.statistics()["held_bytes"] == 2 * size  # the other repair goes on
    ready, _ = gaps.filled(C, fill_c.token, kept(2, 4))
    assert offsets(ready) == [2, 3, 4]
    assert gaps.filled(other, fill_o.token, kept(2, 4)) == ([], None)


def test_a_channel_forgotten_mid_repair_drops_what_it_held_for_no_one():
    gaps = TopicGaps()
    feed(gaps, message(1))
    _, (fill,) = feed(gaps, message(3), message(4))
    gaps.forget(C)  # the host's last member of C left
    assert gaps.statistics()["channels"] == 0 and gaps.statistics()["held_bytes"] == 0
    assert gaps.filled(C, fill.token, kept(2, 4)) == ([], None)
    assert feed(gaps, message(9)) == ([message(9)], [])  # followed afresh: no gap to it


def test_a_gap_whose_message_does_not_fit_in_the_bytes_held_goes_on_at_once():
    size = len(message(3).frame) + HELD_COST
    gaps = TopicGaps(max_held_bytes=2 * size)
    other = ChannelId(6)
    feed(gaps, message(1), message(1, channel=other))
    feed(gaps, message(3), message(4))  # C's repair holds all there is room for
    out, fills = feed(gaps, message(3, channel=other))
    assert out == [message(3, channel=other)] and fills == []  # not lost, not read
    assert gaps.counters["gaps_unfilled"] == 1 and gaps.statistics()["repairing"] == 1


def test_repairs_under_way_are_bounded():
    gaps = TopicGaps(max_repairs=2)
    channels = [ChannelId(c) for c in (5, 6, 7)]
    feed(gaps, *(message(1, channel=c) for c in channels))
    out, fills = feed(gaps, *(message(3, channel=c) for c in channels))
    assert [f.channel for f in fills] == channels[:2]
    assert out == [message(3, channel=channels[2])]  # the third: left as it is, counted
    assert gaps.counters["gaps_unfilled"] == 1
    gaps.filled(channels[0], fills[0].token, kept(2, 2))
    _, (fill,) = feed(gaps, message(5, channel=channels[2]))  # room again
    assert fill.channel == channels[2]
