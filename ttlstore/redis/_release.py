"""Background release of the claim that a failed ``begin`` may have left behind.

A ``begin`` whose call timed out or lost its connection may still run on the server: at once
with only the reply lost, or late, once a frozen Redis resumes and reads what its sockets hold
(redis-py may have sent it twice, on two connections). It then claims the key with a token that
only the caller knows, and every retry of the key answers "in progress" for the whole lease.
The caller that gave up knows its token, so it releases that claim itself, in the background:

- ``release.lua`` compares tokens, so an attempt never ends anyone else's claim, whatever it
  finds and whenever it runs;
- while Redis fails, one attempt at a time probes it, backing off from 0.05 s to 0.5 s, so an
  outage costs one round trip per probe, not one per pending claim;
- once Redis answers, the claim is gone (or was never made), but a copy of the ``begin`` still
  queued behind the answer could claim the key just after: the key is checked again 0.1, 0.5 and
  2 s after the first answer. Finding another owner's claim or record ends the job at once (a
  late ``begin`` of ours can no longer claim the key);
- a job ends after 600 attempts or 5 minutes without an answer, and at most 10 000 jobs wait per
  store: past that a claim lasts its lease, as it would without this. Faults and give-ups are
  logged on ``ttlstore``, each at most once per 10 s with a count.

:class:`ReleaseQueue` holds that schedule without I/O (tested with a fake clock);
:class:`ThreadReleaser` runs it on a daemon thread for the sync store, :class:`TaskReleaser` on
an asyncio task (held in a set) for the async one. Both end when nothing is pending.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from ttlstore._faults import FaultLog
from ttlstore.redis._client import FAILURES

logger = logging.getLogger("ttlstore")

RELEASED, ABSENT, OTHER = 1, 0, -1  # what release.lua answers
_FIRST_DELAY = 0.05  # seconds between probes while Redis fails: doubling up to _MAX_DELAY
_MAX_DELAY = 0.5
_RECHECKS = (0.1, 0.5, 2.0)  # seconds after Redis first answers a job
_MAX_ATTEMPTS = 600
_GIVE_UP_AFTER = 300.0  # seconds without an answer
_MAX_PENDING = 10_000


class _Job:
    """One claim to release: its key and token, and where its schedule stands."""

    __slots__ = ("answered_at", "attempts", "checks", "deadline", "key", "token")

    def __init__(self, key: str, token: str, deadline: float) -> None:
        self.key = key
        self.token = token
        self.deadline = deadline
        self.attempts = 0
        self.answered_at: float | None = None
        self.checks = 0


class ReleaseQueue:
    """Which claims to release and when; what each attempt's outcome means. No I/O, no lock:
    the drivers call it under their own lock (or on their one event loop)."""

    __slots__ = (
        "_clock",
        "_delay",
        "_faults",
        "_gave_up_log",
        "_heap",
        "_probe_at",
        "_seq",
        "gave_up",
        "in_flight",
        "released",
    )

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = 0
        self._probe_at = 0.0  # no attempt before this while Redis fails
        self._delay = 0.0
        self._faults = FaultLog(f"{what} (background release)")
        self._gave_up_log = FaultLog(f"{what} (background release)")
        self.in_flight = 0
        self.released = 0  # claims a job ended
        self.gave_up = 0  # jobs dropped unanswered (or refused: too many pending)

    def __len__(self) -> int:
        """Jobs waiting or being attempted."""
        return len(self._heap) + self.in_flight

    def add(self, key: str, token: str, error: BaseException) -> bool:
        """Release ``key``'s claim by ``token`` as soon as possible; False if too many wait."""
        if len(self) >= _MAX_PENDING:
            self.gave_up += 1
            self._gave_up_log.log(
                error, f"{_MAX_PENDING} releases pending already: this claim lasts its lease"
            )
            return False
        now = self._clock()
        self._push(_Job(key, token, now + _GIVE_UP_AFTER), now)
        return True

    def _push(self, job: _Job, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, job))

    def next_due(self) -> float | None:
        """When the next attempt is due (clock time), None when nothing waits."""
        if not self._heap:
            return None
        return max(self._heap[0][0], self._probe_at)

    def pop_due(self) -> _Job | None:
        """A job to attempt now, if one is due; it counts as in flight until its outcome."""
        due = self.next_due()
        if due is None or due > self._clock():
            return None
        job = heapq.heappop(self._heap)[2]
        self.in_flight += 1
        return job

    def answered(self, job: _Job, reply: object) -> None:
        """Redis ran the release script for ``job`` and answered ``reply``."""
        self.in_flight -= 1
        now = self._clock()
        self._delay = 0.0
        self._probe_at = now
        if reply == RELEASED:
            self.released += 1
        if reply not in (RELEASED, ABSENT):
            return  # another owner's claim or record: a late begin of ours cannot take the key
        if job.answered_at is None:
            job.answered_at = now
        if job.checks < len(_RECHECKS):
            self._push(job, job.answered_at + _RECHECKS[job.checks])
            job.checks += 1

    def failed(self, job: _Job, error: BaseException) -> None:
        """The attempt for ``job`` met a Redis fault: back off, try again later or give up."""
        self.in_flight -= 1
        now = self._clock()
        job.attempts += 1
        self._delay = min(max(2 * self._delay, _FIRST_DELAY), _MAX_DELAY)
        self._probe_at = now + self._delay
        if job.attempts >= _MAX_ATTEMPTS or now >= job.deadline:
            self.gave_up += 1
            self._gave_up_log.log(error, "gave up releasing a claim: it lasts its lease")
            return
        self._faults.log(error, "retrying to release claims of failed begins")
        self._push(job, now)

    def requeue(self, job: _Job) -> None:
        """Put back a job whose attempt was interrupted (its driver was cancelled)."""
        self.in_flight -= 1
        self._push(job, self._clock())

    def clear(self) -> None:
        """Forget every job (their store is gone: nobody waits for its keys here any more)."""
        self._heap.clear()
        self.in_flight = 0

    def dropped(self, job: _Job, error: BaseException) -> None:
        """The attempt for ``job`` raised something that is not a Redis fault: a bug."""
        self.in_flight -= 1
        self.gave_up += 1
        logger.error("background release of a claim failed; it lasts its lease", exc_info=error)


class ThreadReleaser:
    """Runs a :class:`ReleaseQueue` on a daemon thread, started when a job comes and ended when
    none is left. ``attempt()`` gives the function that runs the release script (blocking), or
    None once its store is gone (a weak method: the thread never keeps a store alive)."""

    __slots__ = ("_attempt", "_cond", "_queue", "_thread")

    def __init__(
        self, what: str, attempt: Callable[[], Callable[[str, str], object] | None]
    ) -> None:
        self._queue = ReleaseQueue(what)
        self._attempt = attempt
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def queue(self) -> ReleaseQueue:
        return self._queue

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def schedule(self, key: str, token: str, error: BaseException) -> None:
        with self._cond:
            if not self._queue.add(key, token, error):
                return
            # Not alive though set: the process forked after a thread had started.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ttlstore-redis-release", daemon=True
                )
                self._thread.start()
            else:
                self._cond.notify_all()

    def _run(self) -> None:
        queue = self._queue
        while True:
            with self._cond:
                job = queue.pop_due()
                while job is None:
                    due = queue.next_due()
                    if due is None:
                        self._thread = None
                        self._cond.notify_all()  # drain() waits for this
                        return
                    self._cond.wait(max(0.0, due - time.monotonic()))
                    job = queue.pop_due()
            attempt = self._attempt()
            if attempt is None:
                with self._cond:
                    queue.clear()
                continue
            try:
                reply = attempt(job.key, job.token)
            except FAILURES as error:
                with self._cond:
                    queue.failed(job, error)
            except Exception as error:
                with self._cond:
                    queue.dropped(job, error)
            else:
                with self._cond:
                    queue.answered(job, reply)
            del attempt  # hold the store only while attempting

    def drain(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._thread is None, timeout)


class TaskReleaser:
    """Runs a :class:`ReleaseQueue` on an asyncio task of the loop that scheduled the latest
    job, ended when none is left. ``attempt()`` gives the coroutine function that runs the
    release script, or None once its store is gone."""

    __slots__ = ("_attempt", "_queue", "_tasks", "_waker")

    def __init__(
        self, what: str, attempt: Callable[[], Callable[[str, str], Awaitable[object]] | None]
    ) -> None:
        self._queue = ReleaseQueue(what)
        self._attempt = attempt
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: a task is not GC'd
        self._waker: asyncio.Future[None] | None = None  # what the sleeping task awaits

    @property
    def queue(self) -> ReleaseQueue:
        return self._queue

    @property
    def pending(self) -> int:
        return len(self._queue)

    def schedule(self, key: str, token: str, error: BaseException) -> None:
        if not self._queue.add(key, token, error):
            return
        loop = asyncio.get_running_loop()
        if any(task.get_loop() is loop and not task.done() for task in self._tasks):
            if self._waker is not None and self._waker.get_loop() is loop:
                _wake(self._waker)
            return
        task = loop.create_task(self._run(), name="ttlstore-redis-release")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            job = queue.pop_due()
            if job is None:
                due = queue.next_due()
                if due is None:
                    return
                # A bare future, woken by the timer or by schedule(): cancelling it is plain.
                self._waker = waker = loop.create_future()
                timer = loop.call_later(max(0.0, due - time.monotonic()), _wake, waker)
                try:
                    await waker
                finally:
                    timer.cancel()
                    self._waker = None
                continue
            attempt = self._attempt()
            if attempt is None:
                queue.clear()
                return
            try:
                reply = await attempt(job.key, job.token)
            except FAILURES as error:
                queue.failed(job, error)
            except asyncio.CancelledError:
                queue.requeue(job)  # the loop is shutting down: the next loop goes on
                raise
            except Exception as error:
                queue.dropped(job, error)
            else:
                queue.answered(job, reply)
            del attempt  # hold the store only while attempting
            if _cancel_requested():
                # redis-py's asyncio client may finish a command it was cancelled in (seen
                # with 8.1): honour the cancellation here, or a loop's shutdown waits for us.
                raise asyncio.CancelledError

    async def drain(self, timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            tasks = [task for task in self._tasks if task.get_loop() is loop and not task.done()]
            if not tasks:
                return True
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(tasks, timeout=left)


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


def _cancel_requested() -> bool:
    """Whether the current task was asked to cancel (Python 3.11+; False before)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling is not None and cancelling())
