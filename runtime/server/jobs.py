"""Running generations: the code every front shares, and the one-box queue with its worker thread.

`run_plan` runs one validated job on a Pipeline and `failure_for` turns what it raised into the
client's answer; the one-box `Worker` and each cluster replica (runtime/cluster) both use them.

One box: ONNX Runtime sessions (and the GPU memory behind them) serve one generation at a time, so
a single thread runs every job while the event loop keeps answering progress, health and new
requests. Jobs wait in a bounded FIFO: when it is full, `generate` refuses at once (429) rather than
letting requests pile up in memory. A job whose client went away is taken out of the queue (never
run) or stopped at the next step (if running). The worker catches every exception a job raises,
answers that job's request, and goes on with the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import NonFiniteError, OutOfMemoryError, UserError
from ..pipeline.running import sampler_steps
from .images import map_base64, png_base64
from .mapping import Plan
from .tasks import JobProgress, ProgressUpdate, TaskBoard

if TYPE_CHECKING:
    from ..pipeline import Pipeline


class Pipelines(Protocol):
    """The loaded pipelines the worker runs jobs on (runtime.server.models.ModelSet)."""

    def pipeline(self, title: str | None) -> Pipeline:
        """The pipeline of checkpoint `title` (None: the current one), loaded if need be."""
        ...

    def provider(self) -> str: ...


log = logging.getLogger(__name__)
# Jobs with at least this many pixels per batch give their memory back when they end (about 0.1 s
# on a full-size model): a 512x512 job otherwise leaves gigabytes in onnxruntime's arenas.
RELEASE_AFTER_PIXELS = 256 * 256


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after

    def __reduce__(self) -> tuple:  # crosses process boundaries in the cluster
        return QueueFull, (self.retry_after,)


class Unavailable(Exception):
    """Nothing can run the job now (shutting down, no replica): 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple:
        return Unavailable, (str(self), self.retry_after)


class JobFailure(Exception):
    """What a failed job answers: a status, an error kind and a message for the client."""

    def __init__(
        self, status: int, kind: str, message: str, field: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __reduce__(self) -> tuple:
        return JobFailure, (self.status, self.kind, self.message, self.field, self.retry_after)


@dataclass
class JobResult:
    images: list[str]  # base64 PNGs; empty when the request said send_images=false
    infotexts: list[str]
    interrupted: bool
    job_timestamp: str
    where: dict[str, str] = field(default_factory=dict)  # cluster: the replica and node that ran it


def run_plan(
    pipe: Pipeline,
    plan: Plan,
    report: Callable[[ProgressUpdate], Any],
    cancel: threading.Event,
    abandoned: Callable[[], bool],
) -> JobResult:
    """Run the batches; stop after the one an interrupt (`cancel`) reached, as A1111 does."""
    images: list[str] = []
    infotexts: list[str] = []
    interrupted = False
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    for index, prepared in enumerate(plan.batches):
        hires = prepared.hires
        hires_steps = sampler_steps(hires.sampler, hires.schedule) if hires is not None else 0
        steps = sampler_steps(prepared.request.sampler, prepared.schedule) + hires_steps
        report(ProgressUpdate(index, 0, steps))
        out = pipe.run(prepared, "np", callback=_pass_counter(report, index, steps), cancel_event=cancel)
        if abandoned():
            break  # nobody will read the images
        infotexts.extend(out.infotexts)
        if plan.send_images:
            images.extend(png_base64(image, text) for image, text in zip(out.images, out.infotexts, strict=True))
        if out.interrupted:
            interrupted = True
            break
    if plan.send_images and not abandoned():
        # The ControlNet extension's postprocess: the detected maps once, after every image.
        images.extend(map_base64(item) for item in plan.detected_maps)
    return JobResult(images, infotexts, interrupted, timestamp)


def _pass_counter(report: Callable[[ProgressUpdate], Any], index: int, steps: int) -> Callable[..., None]:
    """Progress over both passes of a hires job: each pass counts its steps from 1."""
    counted = {"done": 0, "last": 0}

    def on_step(step: int, _total: int, x: Any) -> None:
        if step == 1 and counted["last"] > 0:  # the second pass began
            counted["done"] += counted["last"]
        counted["last"] = step
        report(ProgressUpdate(index, counted["done"] + step, steps, x[0].copy()))  # the first image: a preview

    return on_step


def release_if_large(pipe: Pipeline, plan: Plan, job: str) -> None:
    """After a large job, give its memory back instead of holding it until the next one."""
    prepared = plan.batches[0]
    size = prepared.hires or prepared.request  # a hires job's largest images are its second pass
    if size.width * size.height * len(prepared.seeds) < RELEASE_AFTER_PIXELS:
        return
    try:
        pipe.release_memory()
    except Exception:  # never worth failing a finished job for
        log.exception("job %s: could not release memory", job)


def failure_for(error: Exception, job: str) -> JobFailure:
    """Map what a job raised to its answer: the client's mistake, a full GPU, or our bug."""
    if isinstance(error, JobFailure):
        return error
    if isinstance(error, OutOfMemoryError | MemoryError):  # sessions say which memory (GPU or system) ran out
        log.error("job %s ran out of memory: %s", job, error)
        return JobFailure(503, "OutOfMemory", str(error) or "out of memory; try a smaller size or batch", retry_after=5)
    if isinstance(error, NonFiniteError):
        log.error("job %s: %s", job, error)
        return JobFailure(500, "NonFiniteOutput", str(error))
    if isinstance(error, UserError):
        return JobFailure(422, "InvalidRequest", str(error), getattr(error, "field", None))
    log.error("job %s failed", job, exc_info=error)
    return JobFailure(500, "InternalError", "generation failed because of a server error; see the server log")


def outcome_name(outcome: JobResult | BaseException, abandoned: bool) -> str | None:
    """The /health counter an ended job adds to (None: a 4xx, counted nowhere)."""
    if abandoned:
        return "dropped"
    if isinstance(outcome, JobResult):
        return "interrupted" if outcome.interrupted else "completed"
    if isinstance(outcome, JobFailure) and outcome.status < 500:
        return None
    return "failed"


class RetryEstimate:
    """Seconds until a queue slot frees up: about one job's time (a moving average)."""

    def __init__(self) -> None:
        self._average = 0.0

    def record(self, seconds: float) -> None:
        self._average = seconds if not self._average else 0.7 * self._average + 0.3 * seconds

    def seconds(self) -> int:
        return max(1, min(600, math.ceil(self._average or 1.0)))


@dataclass(eq=False)
class Job:
    """One txt2img request on its way through the one-box queue. The future lives on the event loop."""

    task_id: str
    plan: Plan | None  # None: an action (loading a checkpoint...) run between jobs
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancel: threading.Event = field(default_factory=threading.Event)  # interrupt, or the client left
    abandoned: bool = False
    action: Callable[[], Any] | None = None

    @classmethod
    def create(cls, task_id: str, plan: Plan | None, action: Callable[[], Any] | None = None) -> Job:
        loop = asyncio.get_running_loop()
        return cls(task_id, plan, loop, loop.create_future(), action=action)

    def settle(self, outcome: Any) -> None:
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
            log.debug("job %s finished after the event loop closed", self.task_id)


class Worker:
    """The one-box backend: a bounded FIFO and the thread that runs its jobs, one at a time."""

    def __init__(self, pipelines: Pipelines, queue_size: int, board: TaskBoard | None = None) -> None:
        self._pipelines = pipelines
        self.capacity = queue_size
        self.board = board or TaskBoard()
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._current: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._retry = RetryEstimate()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run_forever, name="generation-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self, timeout: float = 10.0) -> None:
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

    async def generate(self, task_id: str, plan: Plan) -> JobResult:
        """Queue the job and wait for it; QueueFull (429) at once when the queue is full. Cancelling
        the wait (the client left) drops the job if it waits, or stops it at its next step."""
        job = Job.create(task_id, plan)
        self.submit(job)
        try:
            return await job.future  # a JobFailure raises here and becomes its error answer
        except asyncio.CancelledError:
            self.abandon(job)
            raise

    async def call(self, action: Callable[[], Any]) -> Any:
        """Run `action` on the worker thread once the jobs queued before it have run (A1111 loads
        checkpoints under its queue lock too); its exception raises here. Never refused for a full
        queue: it is what a client waits for before sending jobs."""
        job = Job.create("action", None, action)
        self.submit(job)
        return await job.future

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.alive:
                raise Unavailable("the generation worker is not running")
            if job.plan is None:
                self._waiting.append(job)
                self._cond.notify()
                return
            if len(self._waiting) >= self.capacity:
                self.board.reject()
                raise QueueFull(self._retry.seconds())
            self._waiting.append(job)
            self.board.queued(job.task_id, len(job.plan.batches))
            self._cond.notify()
        log.info("job %s queued (%s waiting)", job.task_id, len(self._waiting))

    def abandon(self, job: Job) -> None:
        """The client went away: drop the job if it still waits, stop it if it runs."""
        with self._cond:
            job.abandoned = True
            job.cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self.board.finish(job.task_id, "dropped")
                log.info("job %s dropped: its client disconnected while it waited", job.task_id)

    def interrupt(self, task_id: str | None = None) -> int:
        """A1111's Interrupt: the running job (if `task_id` is None or names it) stops at its next
        step and answers what it has. Returns how many jobs were interrupted."""
        with self._cond:
            job = self._current
            if job is None or job.plan is None or task_id not in (None, job.task_id):
                return 0
            job.cancel.set()
            progress = self.board.progress_of(job.task_id)
            if progress is not None:
                progress.mark_interrupted()
            log.info("job %s interrupted", job.task_id)
            return 1

    def health(self) -> dict[str, Any]:
        with self._cond:
            running, waiting = int(self._current is not None), len(self._waiting)
        queue = {"running": running, "waiting": waiting, "capacity": self.capacity}
        return {"ok": self.alive, "provider": self._pipelines.provider(), "queue": queue}

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
            except Exception:  # a bug in the bookkeeping itself: answer the job, keep serving the others
                log.exception("job %s: unexpected error outside the job", job.task_id)
                job.settle(JobFailure(500, "InternalError", "the server failed; see the server log"))
            finally:
                with self._cond:
                    self._current = None
        log.info("generation worker stopped")

    def _act(self, job: Job, action: Callable[[], Any]) -> None:
        try:
            outcome = action()
        except Exception as error:
            outcome = failure_for(error, job.task_id)
        job.settle(outcome)

    def _serve(self, job: Job) -> None:
        if job.action is not None or job.plan is None:
            self._act(job, job.action or (lambda: None))
            return
        plan = job.plan
        started = time.monotonic()
        progress: JobProgress = self.board.start(job.task_id)
        pipe = None
        try:
            pipe = self._pipelines.pipeline(plan.model)
            outcome: JobResult | BaseException = run_plan(
                pipe, plan, progress.update, job.cancel, lambda: job.abandoned
            )
        except Exception as error:
            outcome = failure_for(error, job.task_id)
        if pipe is not None:
            release_if_large(pipe, plan, job.task_id)
        seconds = time.monotonic() - started
        self._retry.record(seconds)
        self.board.finish(job.task_id, outcome_name(outcome, job.abandoned))
        log.info("job %s finished in %.2f s: %s", job.task_id, seconds, describe(outcome))
        job.settle(outcome)


def describe(outcome: JobResult | BaseException) -> str:
    if isinstance(outcome, JobResult):
        return f"{len(outcome.infotexts)} images" + (" (interrupted)" if outcome.interrupted else "")
    return f"{type(outcome).__name__}: {outcome}"
