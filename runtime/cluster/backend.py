"""The ingress side: the server's Backend on top of a Serve handle to the Generator replicas.

Serve's router sends each job to a replica with a free slot (max_ongoing_requests = 1), preferring
one that holds the job's checkpoint (its multiplexed model id), and holds at most
`max_queued_requests` behind them; past that the handle raises BackPressureError, answered here
as the server's JSON 429 with Retry-After. A replica that dies mid-job ends its request in a 503
with Retry-After (Serve starts a new replica; the others keep serving). Task ids, progress and
interrupts live on this process's TaskBoard, as in the one-box server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from ..graphs.sessions import CPU, CUDA
from ..server.jobs import JobFailure, JobResult, QueueFull, RetryEstimate, Unavailable, outcome_name
from ..server.mapping import Plan
from ..server.tasks import TaskBoard
from .generator import DONE, PROGRESS, STARTED
from .settings import ClusterSettings

log = logging.getLogger("runtime.cluster")

GENERATOR = "Generator"
STATUS_CACHE_SECONDS = 1.0  # /health is polled; Serve's controller is asked at most this often
REPLICA_LOST_RETRY_AFTER = 5  # another replica can take the job at once; a new one loads meanwhile
_STARTING = ("STARTING", "UPDATING", "RECOVERING")
ORT_PROVIDERS = {"cpu": CPU, "cuda": CUDA}  # what Pipeline.provider says, before a replica reports it


class ServeBackend:
    def __init__(self, handle: Any, settings: ClusterSettings) -> None:
        self._handle = handle.options(stream=True)
        self._settings = settings
        self.board = TaskBoard()
        self._interrupts: set[str] = set()
        self._lock = threading.Lock()
        self._retry = RetryEstimate()
        self._provider = ORT_PROVIDERS[settings.provider]
        self._status: tuple[float, dict[str, Any]] = (0.0, {})

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def call(self, action: Callable[[], Any]) -> Any:
        """The ingress's own bookkeeping (the checkpoint list, the current one): the replicas load
        checkpoints when jobs name them, so a switch or an unload here loads or frees nothing."""
        return await asyncio.to_thread(action)

    async def generate(self, task_id: str, plan: Plan) -> JobResult:
        self.board.queued(task_id, len(plan.batches))
        started = time.monotonic()
        outcome: JobResult | BaseException | None = None
        # Serve's model multiplexing: the job goes to a replica that holds its checkpoint when one has room.
        stream = self._handle.options(multiplexed_model_id=plan.model or "").generate.remote(task_id, plan)
        try:
            outcome = await self._follow(task_id, stream)
        except asyncio.CancelledError:
            stream.cancel()  # the replica stops the job at its next step
            self.board.finish(task_id, "dropped")
            raise
        except BackPressureError:
            self.board.reject(task_id)
            raise QueueFull(self._retry.seconds()) from None
        except DeploymentUnavailableError as error:
            outcome = Unavailable(f"no generation replica is available: {error}")
        except (RayActorError, RequestCancelledError) as error:
            log.error("task %s lost its replica: %s", task_id, error)
            outcome = JobFailure(
                503, "ReplicaLost", "the replica running this job stopped (its process ended); send the request again",
                retry_after=REPLICA_LOST_RETRY_AFTER,
            )  # fmt: skip
        finally:
            with self._lock:
                self._interrupts.discard(task_id)
        self._retry.record(time.monotonic() - started)
        self.board.finish(task_id, outcome_name(outcome, abandoned=False))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _follow(self, task_id: str, stream: Any) -> JobResult | JobFailure:
        progress = None
        async for kind, payload in stream:
            if kind == STARTED:
                self._provider = payload["provider"]
                progress = self.board.start(task_id)
                if task_id in self._interrupts:
                    progress.mark_interrupted()
            elif kind == PROGRESS and progress is not None:
                progress.update(payload)
            elif kind == DONE:
                return payload
        raise JobFailure(500, "InternalError", "the replica ended the job without an answer; see the server log")

    def interrupt(self, task_id: str | None) -> int:
        """Without an id: every running job (A1111's Interrupt). The replica running it learns at its
        next poll (interrupt_requested) and answers what it has."""
        targets = self.board.running_ids() if task_id is None else [task_id]
        targets = [task for task in targets if self.board.progress_of(task) is not None]
        with self._lock:
            self._interrupts.update(targets)
        for task in targets:
            progress = self.board.progress_of(task)
            if progress is not None:
                progress.mark_interrupted()
        return len(targets)

    def interrupt_requested(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._interrupts

    def health(self) -> dict[str, Any]:
        running, waiting = self.board.sizes()
        replicas = self._replica_counts()
        queue = {"running": running, "waiting": waiting, "capacity": self._settings.max_queued_requests}
        return {"ok": replicas["ready"] > 0, "provider": self._provider, "queue": queue, "replicas": replicas}

    def _replica_counts(self) -> dict[str, int]:
        checked, counts = self._status
        if time.monotonic() - checked < STATUS_CACHE_SECONDS:
            return counts
        try:
            app = serve.status().applications[self._settings.app_name]
            states = {str(getattr(k, "value", k)): v for k, v in app.deployments[GENERATOR].replica_states.items()}
        except Exception as error:  # the controller restarting: say nothing is known to be ready
            log.warning("could not read the replicas' state from Serve: %s", error)
            states = {}
        ready = states.get("RUNNING", 0)
        starting = sum(states.get(state, 0) for state in _STARTING)
        target = self._settings.replicas
        if self._settings.scaling.max_replicas is not None:
            target = max(self._settings.scaling.min_replicas, ready + starting)
        counts = {"target": target, "ready": ready, "starting": starting, "dead": max(0, target - ready - starting)}
        self._status = (time.monotonic(), counts)
        return counts
