"""The job queue and the one worker thread that owns the model.

ONNX Runtime sessions (and the GPU memory behind them) serve one generation at a time, so a single
thread runs every job while the event loop keeps answering progress, health and new requests.
Jobs wait in a bounded FIFO: when it is full, `submit` refuses at once (429) rather than letting
requests pile up in memory. A job whose client went away is taken out of the queue (never run) or
stopped at the next step (if running). The worker catches every exception a job raises, answers
that job's request, and goes on with the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from .images import png_base64, preview_base64
from .mapping import Plan

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The worker is not running (shutting down): 503."""


class JobFailure(Exception):
    """What a failed job answers: a status, an error kind and a message for the client."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field


@dataclass
class JobResult:
    images: list[str]  # base64 PNGs; empty when the request said send_images=false
    infotexts: list[str]
    interrupted: bool
    job_timestamp: str


@dataclass(eq=False)
class Job:
    """One txt2img request on its way through the queue. The future lives on the event loop."""

    plan: Plan
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancel: threading.Event = field(default_factory=threading.Event)  # interrupt, or the client left
    abandoned: bool = False
    id: int = 0

    @classmethod
    def create(cls, plan: Plan) -> Job:
        loop = asyncio.get_running_loop()
        return cls(plan, loop, loop.create_future())

    def settle(self, outcome: JobResult | BaseException) -> None:
        """Hand the outcome to the waiting request, from any thread."""

        def deliver() -> None:
            if self.future.done():
                return  # the request was cancelled while we worked
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)

        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody waits
            log.debug("job %s finished after the event loop closed", self.id)


class Progress:
    """What GET /sdapi/v1/progress reports, written by the worker and read by the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._started = 0.0
        self._latents: np.ndarray | None = None
        self.end()

    def begin(self, job_count: int) -> None:
        with self._lock:
            self._state.update(
                job="txt2img", job_count=job_count, job_no=0, sampling_step=0, sampling_steps=0,
                interrupted=False, job_timestamp=datetime.now().strftime("%Y%m%d%H%M%S"),
            )  # fmt: skip
            self._started = time.monotonic()

    def begin_batch(self, index: int, steps: int) -> None:
        with self._lock:
            self._state.update(job_no=index, sampling_step=0, sampling_steps=steps)

    def step(self, step: int, latents: np.ndarray) -> None:
        with self._lock:
            self._state["sampling_step"] = step
            self._latents = latents[0].copy()  # the first image: a preview, not the batch

    def mark_interrupted(self) -> None:
        with self._lock:
            self._state["interrupted"] = True

    def end(self) -> None:
        with self._lock:
            self._state = {
                "skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
            }  # fmt: skip
            self._latents = None

    @property
    def job_timestamp(self) -> str:
        with self._lock:
            return self._state["job_timestamp"]

    def snapshot(self, with_preview: bool) -> dict[str, Any]:
        """A1111's progress answer: progress over all batches, ETA from the time spent so far."""
        with self._lock:
            state, latents, elapsed = dict(self._state), self._latents, time.monotonic() - self._started
        if not state["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        steps = state["sampling_steps"] or 1
        done = (state["job_no"] + state["sampling_step"] / steps) / state["job_count"]
        eta = elapsed * (1 - done) / done if done > 0 else 0.0
        text = f"batch {state['job_no'] + 1}/{state['job_count']}, step {state['sampling_step']}/{steps}"
        preview = preview_base64(latents) if with_preview and latents is not None else None
        return {"progress": min(done, 1.0), "eta_relative": eta, "state": state, "current_image": preview,
                "textinfo": text}  # fmt: skip


class Worker:
    """The bounded FIFO and the thread that runs its jobs, one at a time."""

    def __init__(self, pipe: Pipeline, queue_size: int) -> None:
        self._pipe = pipe
        self.capacity = queue_size
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._current: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._average_seconds = 0.0
        self.progress = Progress()
        self.counts = {"completed": 0, "interrupted": 0, "rejected": 0, "dropped": 0, "failed": 0}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_forever, name="generation-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the running job at its next step, refuse the waiting ones, end the thread."""
        with self._cond:
            self._stopping = True
            if self._current is not None:
                self._current.cancel.set()
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for job in waiting:
            job.settle(Unavailable("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # -- what the routes call -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.alive:
                raise Unavailable("the generation worker is not running")
            if len(self._waiting) >= self.capacity:
                self.counts["rejected"] += 1
                raise QueueFull(self._retry_after())
            job.id = next(self._ids)
            self._waiting.append(job)
            self._cond.notify()
        log.info("job %s queued (%s waiting)", job.id, len(self._waiting))

    def abandon(self, job: Job) -> None:
        """The client went away: drop the job if it still waits, stop it if it runs."""
        with self._cond:
            job.abandoned = True
            job.cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self.counts["dropped"] += 1
                log.info("job %s dropped: its client disconnected while it waited", job.id)

    def interrupt(self) -> bool:
        """A1111's Interrupt: the running job stops at its next step and answers what it has."""
        with self._cond:
            if self._current is None:
                return False
            self._current.cancel.set()
            self.progress.mark_interrupted()
            log.info("job %s interrupted", self._current.id)
            return True

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self._current is not None, "waiting": len(self._waiting), "capacity": self.capacity}

    def job_counts(self) -> dict[str, int]:
        with self._cond:
            return dict(self.counts)

    def _retry_after(self) -> int:
        # A slot frees up when the running job ends: about one job's time.
        return max(1, min(600, math.ceil(self._average_seconds or 1.0)))

    # -- the worker thread ----------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self._current = self._waiting.popleft()
            return self._current

    def _run_forever(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._serve(job)
            except Exception:  # a bug in the bookkeeping itself: keep serving the others
                log.exception("job %s: unexpected error outside the job", job.id)
            finally:
                with self._cond:
                    self._current = None
        log.info("generation worker stopped")

    def _serve(self, job: Job) -> None:
        started = time.monotonic()
        self.progress.begin(len(job.plan.batches))
        try:
            outcome: JobResult | BaseException = self._generate(job)
        except Exception as error:
            outcome = self._failure(job, error)
        finally:
            self.progress.end()
        seconds = time.monotonic() - started
        self._average_seconds = seconds if not self._average_seconds else 0.7 * self._average_seconds + 0.3 * seconds
        self._count(job, outcome)
        log.info("job %s finished in %.2f s: %s", job.id, seconds, _describe(outcome))
        job.settle(outcome)

    def _count(self, job: Job, outcome: JobResult | BaseException) -> None:
        with self._cond:
            if job.abandoned:
                self.counts["dropped"] += 1
            elif isinstance(outcome, JobFailure) and outcome.status >= 500:
                self.counts["failed"] += 1
            elif isinstance(outcome, JobResult):
                self.counts["interrupted" if outcome.interrupted else "completed"] += 1

    @staticmethod
    def _failure(job: Job, error: Exception) -> JobFailure:
        """Map what a job raised to its answer: the client's mistake, a full GPU, or our bug."""
        if isinstance(error, UserError):
            return JobFailure(422, "InvalidRequest", str(error), getattr(error, "field", None))
        text = str(error).lower()
        if isinstance(error, MemoryError) or "out of memory" in text or "failed to allocate" in text:
            log.error("job %s ran out of memory: %s", job.id, error)
            return JobFailure(503, "OutOfMemory", "the GPU ran out of memory; try a smaller size or batch")
        log.exception("job %s failed", job.id, exc_info=error)
        return JobFailure(500, "InternalError", "generation failed because of a server error; see the server log")

    def _generate(self, job: Job) -> JobResult:
        """Run the batches; stop after the one an interrupt reached, as A1111 does."""
        plan, images, infotexts, interrupted = job.plan, [], [], False
        for index, prepared in enumerate(plan.batches):
            self.progress.begin_batch(index, prepared.schedule.steps)
            out = self._pipe.run(
                prepared, "np", callback=lambda step, _total, x: self.progress.step(step, x), cancel_event=job.cancel
            )
            if job.abandoned:
                break  # nobody will read the images
            infotexts.extend(out.infotexts)
            if plan.send_images:
                images.extend(png_base64(image, text) for image, text in zip(out.images, out.infotexts, strict=True))
            if out.interrupted:
                interrupted = True
                break
        return JobResult(images, infotexts, interrupted, self.progress.job_timestamp)


def _describe(outcome: JobResult | BaseException) -> str:
    if isinstance(outcome, JobResult):
        return f"{len(outcome.infotexts)} images" + (" (interrupted)" if outcome.interrupted else "")
    return f"{type(outcome).__name__}: {outcome}"
