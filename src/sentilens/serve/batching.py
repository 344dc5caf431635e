"""Micro-batching: one worker thread owns the model; requests wait for it in a bounded queue.

Request handlers (on the event loop) submit jobs and await their futures; they never touch
the model. The worker takes the first waiting job, then keeps taking jobs for up to
``max_wait_s`` or until it holds ``max_batch`` posts, and runs the prediction jobs that share
a keep ratio as one ``predictor.predict`` call (a single request larger than ``max_batch`` is
run alone: the predictors batch internally). A *call* job (e.g. the heatmap, which hooks the
vision tower) runs alone with exclusive use of the model.

The queue holds at most ``queue_size`` jobs: ``submit`` raises :class:`QueueFull` instead of
letting the backlog grow, and the app turns that into 503 with Retry-After. If a merged call
fails, each of its jobs is retried alone, so one bad post cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sentilens.data.records import Post
from sentilens.predict import Prediction, Predictor

log = logging.getLogger("sentilens.serve")


class QueueFull(Exception):
    """The queue of waiting requests is full; the client should retry later."""


@dataclass
class Job:
    """Posts to predict at one keep ratio, or (``call`` set) a function to run with the predictor."""

    posts: Sequence[Post]
    keep_ratio: float | None
    call: Callable[[Predictor], Any] | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def size(self) -> int:
        return len(self.posts)


class Batcher:
    """A bounded queue in front of one predictor, drained by one worker thread."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_s: float, queue_size: int):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.capacity = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sentilens-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the worker finish what is queued, then end it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, posts: Sequence[Post], keep_ratio: float | None = None) -> asyncio.Future:
        """Queue posts for prediction (call from the event loop); the future gets ``list[Prediction]``."""
        return self._put(posts, keep_ratio, None)

    def submit_call(self, call: Callable[[Predictor], Any]) -> asyncio.Future:
        """Queue ``call(predictor)`` to run alone on the worker; the future gets its result."""
        return self._put((), None, call)

    def _put(self, posts: Sequence[Post], keep_ratio: float | None, call: Callable | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = Job(posts, keep_ratio, call, loop.create_future(), loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def _run(self) -> None:
        while True:
            jobs, stop = self._collect()
            self._execute(jobs)
            if stop:
                return

    def _collect(self) -> tuple[list[Job], bool]:
        """The next jobs to run together, and whether the stop signal came after them."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, posts = [first], first.size
        deadline = time.monotonic() + self.max_wait_s
        while first.call is None and posts < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            if job.call is not None:
                break
            posts += job.size
        return jobs, False

    def _execute(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.future.done()]  # a client that went away needs no answer
        groups: dict[float | None, list[Job]] = {}
        for job in live:
            if job.call is None:
                groups.setdefault(job.keep_ratio, []).append(job)
        for keep_ratio, group in groups.items():
            self._predict(group, keep_ratio)
        for job in live:
            if job.call is not None:
                self._resolve(job, lambda job=job: job.call(self.predictor))

    def _predict(self, group: list[Job], keep_ratio: float | None) -> None:
        posts = [post for job in group for post in job.posts]
        try:
            predictions = self.predictor.predict(posts, keep_ratio=keep_ratio)
        except Exception as err:  # handed to the request, which maps it to a status
            if len(group) == 1:
                self._deliver(group[0], None, err)
            else:
                for job in group:
                    self._predict([job], keep_ratio)
            return
        start = 0
        for job in group:
            self._deliver(job, predictions[start:start + job.size], None)
            start += job.size

    def _resolve(self, job: Job, work: Callable[[], Any]) -> None:
        try:
            result, error = work(), None
        except Exception as err:  # handed to the request, which maps it to a status
            result, error = None, err
        self._deliver(job, result, error)

    @staticmethod
    def _deliver(job: Job, result: list[Prediction] | Any, error: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed (server shutting down)
            log.debug("dropped a result: event loop closed")
