"""The job board on its own (no Ray): queue bound, status transitions, progress, eviction of old results."""

from __future__ import annotations

import asyncio

from serve.ingress import composition_id, parse_composition
from serve.jobs import JobBoard


def run(coroutine):
    return asyncio.run(coroutine)


def test_queue_limit_status_progress_and_eviction():
    board = JobBoard(queue_limit=2, results_kept=2)

    async def scenario():
        assert await board.create("a", "base", {}) and await board.create("b", "base", {})
        assert not await board.create("c", "base", {})  # two active: refused, nothing created
        assert await board.get("c") is None
        await board.progress("a", "sample", 3, 10)
        a = await board.get("a")
        assert a["status"] == "running" and a["progress"] == {"phase": "sample", "done": 3, "total": 10}
        assert a["started_at"] is not None
        await board.finish("a", {"params": {"steps": 10}, "seed": 5, "files": {"mp4": b"m", "gif": b"g"}})
        assert await board.create("c", "base", {})  # a slot is free again
        await board.finish("b", {"error": "ValueError: boom"})
        b = await board.get("b")
        assert (b["status"], b["reason"]) == ("failed", "ValueError: boom")
        assert await board.file("a", "mp4") == b"m" and await board.file("b", "mp4") is None
        await board.progress("b", "sample", 9, 10)  # late events do not revive a finished job
        assert (await board.get("b"))["status"] == "failed"
        await board.finish("c", {"params": {}, "seed": 1, "files": {}})
        assert await board.get("a") is None  # only the newest two finished jobs are kept
        stats = await board.stats()
        assert (stats["done"], stats["failed"], stats["refused"]) == (1, 1, 1)

    run(scenario())


def test_composition_ids_round_trip_in_request_order():
    motions = [("01KB3Q9N4TQ3X1V8D5RZKM2W7H", 1.0), ("01KB3Q9P0C6G2YB7T9F4JX8N5S", 0.5)]
    key = composition_id(motions, ("01KB3Q9PT5M8H0W3R6E2QZ4V1D", 0.8))
    assert key == ("motion:01KB3Q9N4TQ3X1V8D5RZKM2W7H@1.0+motion:01KB3Q9P0C6G2YB7T9F4JX8N5S@0.5"
                   "+appearance:01KB3Q9PT5M8H0W3R6E2QZ4V1D@0.8")
    assert parse_composition(key) == [("motion", *motions[0]), ("motion", *motions[1]),
                                      ("appearance", "01KB3Q9PT5M8H0W3R6E2QZ4V1D", 0.8)]
    assert composition_id([], None) == "base" and parse_composition("base") == []
