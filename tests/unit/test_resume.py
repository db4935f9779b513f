"""actors.resume: which live messages a resuming connection gets, and when (no threads)."""

from __future__ import annotations

from actors.ids import ChannelId, ConnId
from actors.resume import FRESH_LIFE, RESUME_FLOOR_LIFE, Ask, Resumes

C = ChannelId(7)
A, B = ConnId(1), ConnId(2)


def frame(offset: int) -> bytes:
    return b"<%d>" % offset


def test_a_resume_before_any_live_message_holds_them_until_the_replay():
    r = Resumes()
    ask = r.start(A, C, 3, "E", now=0.0)
    assert ask == Ask(A, C, 3, "E")
    assert r.busy(A, C)
    # live 6 and 7 arrive before the router's answer: B gets them, A's wait
    assert r.live(C, 6, frame(6), (A, B)) == ((B,), [])
    assert r.live(C, 7, frame(7), (A, B)) == ((B,), [])
    # the router replayed 4..6 (latest 6): 6 held is a duplicate, 7 follows
    out, again = r.answered(A, C, 6, "E", b"[4][5][6]<resumed>", now=1.0)
    assert (out, again) == (b"[4][5][6]<resumed><7>", None)
    assert not r.busy(A, C)
    # a late copy at or below the floor is dropped; the next one passes and ends the filter
    assert r.live(C, 7, frame(7), (A,)) == ((), [])
    assert r.live(C, 8, frame(8), (A, B)) == ((A, B), [])
    assert r.size() == 0


def test_a_gap_after_the_replay_is_asked_for_quietly_and_what_follows_waits():
    r = Resumes()
    r.start(A, C, 0, "E", now=0.0)
    assert r.answered(A, C, 5, "E", b"[1..5]", now=0.0) == (b"[1..5]", None)
    conns, asks = r.live(C, 8, frame(8), (A,))  # 6 and 7 never came (the topic raced)
    assert conns == () and asks == [Ask(A, C, 5, "E", quiet=True)]
    assert r.live(C, 9, frame(9), (A,)) == ((), [])
    out, again = r.answered(A, C, 9, "E", b"[6][7][8][9]", now=0.0)
    assert (out, again) == (b"[6][7][8][9]", None)


def test_a_gap_among_the_held_messages_is_asked_for_again():
    r = Resumes()
    r.start(A, C, 0, "E", now=0.0)
    r.live(C, 4, frame(4), (A,))
    r.live(C, 6, frame(6), (A,))  # 5 is missing
    out, again = r.answered(A, C, 3, "E", b"[1][2][3]", now=0.0)
    assert out == b"[1][2][3]<4>" and again == Ask(A, C, 4, "E", quiet=True)
    out, again = r.answered(A, C, 6, "E", b"[5][6]", now=0.0)
    assert (out, again) == (b"[5][6]", None)


def test_a_resume_after_live_messages_back_fills_only_what_came_before():
    r = Resumes()
    r.opened(A, C, now=0.0)  # hello: A is written C's live messages from now on
    assert r.live(C, 10, frame(10), (A,)) == ((A,), [])
    assert r.live(C, 11, frame(11), (A,)) == ((A,), [])
    assert r.start(A, C, 4, "E", now=1.0) == Ask(A, C, 4, "E", before=10)
    assert r.busy(A, C)
    assert r.live(C, 12, frame(12), (A,)) == ((A,), [])  # live goes on
    assert r.answered(A, C, 12, "E", b"[5..9]<resumed>", now=1.0) == (b"[5..9]<resumed>", None)
    assert r.size() == 0


def test_without_history_the_held_messages_follow_the_answer():
    r = Resumes()
    r.start(A, C, 0, "", now=0.0)
    r.live(C, 0, frame(0), (A,))  # (offsets are 0 without history; the actor skips them)
    out, again = r.answered(A, C, 0, "", b"<resumed>", now=0.0)
    assert (out, again) == (b"<resumed><0>", None)
    assert r.size() == 0


def test_what_is_kept_is_forgotten_in_time_and_when_the_connection_leaves():
    r = Resumes()
    r.opened(A, C, now=0.0)
    r.opened(B, C, now=10.0)
    r.sweep(FRESH_LIFE + 1)
    assert r.unseen == {C: {B}}  # A's record is too old to be exact any more
    r.start(B, C, 0, "E", now=20.0)
    r.answered(B, C, 3, "E", b"", now=20.0)
    assert r.size() == 1  # B's duplicate filter
    r.sweep(20.0 + RESUME_FLOOR_LIFE + 1)
    assert r.size() == 0
    r.start(A, C, 0, "E", now=30.0)
    r.ended(A, C)
    assert r.size() == 0 and not r.busy(A, C)
    assert r.answered(A, C, 3, "E", b"late", now=31.0) == (b"", None)


def test_no_resume_leaves_the_recipients_untouched():
    r = Resumes()
    conns = (A, B)
    assert r.live(C, 1, frame(1), conns)[0] is conns


def test_a_resume_from_nothing_still_gets_the_live_messages_held_meanwhile():
    """The client asks for its position on a channel it just joined (no epoch): live 2 and 3
    reach the shard while it waits, but the router, which had appended them before the resume
    reached it, answers "latest 3" with no replay. They came after the join: they are owed,
    before the answer (the client takes its position from ``resumed``)."""
    r = Resumes()
    r.start(A, C, 0, "", now=0.0)
    assert r.live(C, 2, frame(2), (A,)) == ((), [])
    assert r.live(C, 3, frame(3), (A,)) == ((), [])
    r.live(C, 4, frame(4), (A,))
    out, again = r.answered(A, C, 3, "E", b"<resumed 3>", now=0.0)
    assert (out, again) == (b"<2><3><resumed 3><4>", None)


def test_a_resume_not_recovered_drops_what_the_client_refetches():
    """A resume from an old epoch is not recovered: the client refetches up to the latest
    offset from its backend, so held messages at or below it are not written (above: are)."""
    r = Resumes()
    r.start(A, C, 5, "OLD", now=0.0)
    r.live(C, 2, frame(2), (A,))
    r.live(C, 3, frame(3), (A,))
    out, again = r.answered(A, C, 2, "E", b"<resumed 2 not recovered>", now=0.0)
    assert (out, again) == (b"<resumed 2 not recovered><3>", None)


def test_a_resume_without_epoch_from_an_offset_is_not_from_nothing():
    """Only offset 0 with no epoch asks a position: a client that resumes from offset 5 with
    no epoch is not recovered, and gets nothing at or below the latest offset (it refetches)."""
    r = Resumes()
    r.start(A, C, 5, "", now=0.0)
    r.live(C, 2, frame(2), (A,))
    out, _ = r.answered(A, C, 2, "E", b"<resumed 2 not recovered>", now=0.0)
    assert out == b"<resumed 2 not recovered>"


def test_a_gap_after_a_resume_from_nothing_is_filled_once():
    """In a cluster the topic and the answer race: a resume from nothing is answered "latest
    3" while live 5 is held (4 not yet arrived). 5 waits, and the router is asked again from 3,
    quietly; its answer replays 4 and 5. What was owed went with the first answer: nothing of
    the replay is written twice."""
    r = Resumes()
    r.start(A, C, 0, "", now=0.0)
    r.live(C, 2, frame(2), (A,))
    r.live(C, 5, frame(5), (A,))
    out, again = r.answered(A, C, 3, "E", b"<resumed 3>", now=0.0)
    assert out == b"<2><resumed 3>"
    assert again is not None and (again.offset, again.quiet) == (3, True)
    out, again = r.answered(A, C, 5, "E", b"<4><5>", now=0.0)
    assert (out, again) == (b"<4><5>", None)
