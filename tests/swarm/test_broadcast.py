"""The transmit-limited broadcast queue."""

from __future__ import annotations

from libpipe.swarm import BroadcastQueue


def queue(limit: int = 3) -> BroadcastQueue:
    return BroadcastQueue(lambda: limit)


def test_fewest_transmissions_first_then_newest_first():
    q = queue()
    q.queue("a", "A1", 40)
    q.queue("b", "B1", 40)
    assert q.take(1000) == ["B1", "A1"]
    q.queue("c", "C1", 40)
    # c was never sent: it goes before a and b, which were sent once.
    assert q.take(1000) == ["C1", "B1", "A1"]


def test_budget_limits_what_one_message_carries():
    q = queue()
    for key in "abcd":
        q.queue(key, key.upper(), 100)
    assert q.take(210) == ["D", "C"]
    assert q.take(210) == ["B", "A"]  # untransmitted news first


def test_newer_news_about_a_member_replaces_older():
    q = queue()
    q.queue("a", "alive@1", 40)
    q.take(1000)
    q.queue("a", "suspect@1", 40)
    assert len(q) == 1
    assert q.transmits("a") == 0
    assert q.take(1000) == ["suspect@1"]


def test_news_leaves_after_the_retransmit_limit():
    q = queue(limit=2)
    q.queue("a", "A", 40)
    assert q.take(1000) == ["A"]
    assert q.transmits("a") == 1
    assert q.take(1000) == ["A"]
    assert "a" not in q and q.take(1000) == []


def test_oversized_entry_is_skipped_not_blocking():
    q = queue()
    q.queue("small", "s", 40)
    q.queue("big", "B", 5000)
    assert q.take(1000) == ["s"]
    assert q.transmits("big") == 0


def test_churn_does_not_grow_the_queue_without_bound():
    q = queue(limit=100)
    for i in range(10_000):
        q.queue(f"k{i % 5}", i, 40)
        q.take(45)
    assert len(q) == 5
    assert len(q._heap) <= 2 * 5 + 64 + 1
