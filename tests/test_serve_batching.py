"""The micro-batching worker of `sentilens serve`, driven deterministically: a predictor that blocks until the
test releases it shows which requests were merged into one model call, the bounded queue, keep-ratio groups,
failure isolation and abandoned requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from sentilens.data.records import Post
from sentilens.predict import Prediction
from sentilens.serve.batching import Batcher, QueueFull


class GatedPredictor:
    """Records every ``predict`` call; each call waits for the test to open the gate. Posts whose text is
    'boom' make the call fail."""

    family = "fake"
    labels = ["a", "b"]
    config: dict = {}

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], float | None]] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]:
        self.calls.append(([p.id for p in posts], keep_ratio))
        self.entered.release()
        self.gate.acquire()
        if any(p.text == "boom" for p in posts):
            raise ValueError("boom")
        return [Prediction(label="a", probabilities={"a": 1.0, "b": 0.0}, kept_tokens=len(p.id)) for p in posts]


def posts(*ids: str, text: str = "hello") -> list[Post]:
    return [Post(id=i, text=text) for i in ids]


async def occupy(batcher: Batcher, predictor: GatedPredictor) -> asyncio.Future:
    """Submit one request and wait until the worker is inside its model call (the queue is then empty)."""
    future = batcher.submit(posts("first"))
    await asyncio.to_thread(predictor.entered.acquire)
    return future


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_waiting_requests_are_merged_up_to_max_batch_and_answered_in_order():
    async def scenario():
        predictor = GatedPredictor()
        batcher = Batcher(predictor, max_batch=4, max_wait_s=0.0, queue_size=8)
        batcher.start()
        first = await occupy(batcher, predictor)
        waiting = [batcher.submit(posts("x1", "x22")), batcher.submit(posts("y333")), batcher.submit(posts("z4444")),
                   batcher.submit(posts("w55555"))]
        for _ in range(3):
            predictor.gate.release()
        results = await asyncio.gather(first, *waiting)
        batcher.stop()
        # the first call held one request; the next took waiting requests until it held 4 posts; then the rest
        assert predictor.calls == [(["first"], None), (["x1", "x22", "y333", "z4444"], None), (["w55555"], None)]
        assert [[p.kept_tokens for p in r] for r in results] == [[5], [2, 3], [4], [5], [6]]

    run(scenario)


def test_a_full_queue_refuses_instead_of_growing():
    async def scenario():
        predictor = GatedPredictor()
        batcher = Batcher(predictor, max_batch=8, max_wait_s=0.0, queue_size=2)
        batcher.start()
        first = await occupy(batcher, predictor)
        queued = [batcher.submit(posts("q1")), batcher.submit(posts("q2"))]
        assert batcher.pending == 2
        with pytest.raises(QueueFull):
            batcher.submit(posts("q3"))
        with pytest.raises(QueueFull):
            batcher.submit_call(lambda p: None)
        predictor.gate.release()
        predictor.gate.release()
        await asyncio.gather(first, *queued)
        assert batcher.pending == 0
        batcher.stop()
        assert predictor.calls == [(["first"], None), (["q1", "q2"], None)]

    run(scenario)


def test_requests_with_different_keep_ratios_are_never_merged():
    async def scenario():
        predictor = GatedPredictor()
        batcher = Batcher(predictor, max_batch=8, max_wait_s=0.0, queue_size=8)
        batcher.start()
        first = await occupy(batcher, predictor)
        waiting = [batcher.submit(posts("a"), 0.5), batcher.submit(posts("b"), None), batcher.submit(posts("c"), 0.5)]
        for _ in range(3):
            predictor.gate.release()
        await asyncio.gather(first, *waiting)
        batcher.stop()
        assert predictor.calls == [(["first"], None), (["a", "c"], 0.5), (["b"], None)]

    run(scenario)


def test_a_failing_post_fails_only_its_own_request():
    async def scenario():
        predictor = GatedPredictor()
        batcher = Batcher(predictor, max_batch=8, max_wait_s=0.0, queue_size=8)
        batcher.start()
        first = await occupy(batcher, predictor)
        good, bad, also_good = (batcher.submit(posts("g1")), batcher.submit(posts("bad", text="boom")),
                                batcher.submit(posts("g2")))
        for _ in range(5):  # first, the merged call, then each of the three alone
            predictor.gate.release()
        await first
        assert [p.label for p in await good] == ["a"] and [p.label for p in await also_good] == ["a"]
        with pytest.raises(ValueError, match="boom"):
            await bad
        batcher.stop()
        assert predictor.calls[1:] == [(["g1", "bad", "g2"], None), (["g1"], None), (["bad"], None), (["g2"], None)]

    run(scenario)


def test_a_call_job_runs_alone_and_an_abandoned_request_is_skipped():
    async def scenario():
        predictor = GatedPredictor()
        batcher = Batcher(predictor, max_batch=8, max_wait_s=0.0, queue_size=8)
        batcher.start()
        first = await occupy(batcher, predictor)
        abandoned = batcher.submit(posts("gone"))
        call = batcher.submit_call(lambda p: ("called", len(p.calls)))
        after = batcher.submit(posts("after"))
        abandoned.cancel()  # its client went away while it waited
        predictor.gate.release()
        predictor.gate.release()
        assert await call == ("called", 1)
        await asyncio.gather(first, after)
        batcher.stop()
        assert predictor.calls == [(["first"], None), (["after"], None)]

    run(scenario)
