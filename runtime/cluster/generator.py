"""The replica: one Pipeline, checked and loaded before Serve sends it any traffic.

Serve counts a replica as starting until its constructor returns, so the model's hashes are checked
and its sessions loaded there. `generate` runs one validated job (the server's `run_plan`) on a
thread and streams what the ingress needs back to it: where it runs, progress with the preview
latents, then the result (or the error answer). Interrupts travel the other way by polling the
ingress, the one process that knows which task a client interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from ..errors import UserError
from ..pipeline import Pipeline
from ..server.jobs import JobFailure, JobResult, failure_for, release_if_large, run_plan
from ..server.mapping import Plan
from ..server.tasks import ProgressUpdate
from .model_check import check_model
from .settings import ClusterSettings

log = logging.getLogger("runtime.cluster")

POLL_SECONDS = 0.5  # how often a running job sends progress and asks whether it was interrupted
INGRESS = "Ingress"

# Stream events: (kind, payload).
STARTED, PROGRESS, DONE = "started", "progress", "done"


class ReplicaRefused(UserError):
    """A replica cannot serve this model (bad path, damaged or different copy): the deployment fails
    with this one line."""


class Generator:
    def __init__(self, settings: ClusterSettings) -> None:
        folder = settings.server.model
        try:
            check_model(folder, settings.fingerprint)
            # No embeddings folder: the ingress matched the prompts, and the vectors come with the plan.
            self.pipe = Pipeline.from_pretrained(
                folder, provider=settings.provider, threads=settings.threads, lora_dir=settings.server.lora_dir,
                lora_cache_mb=settings.server.lora_cache_mb,
            )  # fmt: skip
        except UserError as error:
            raise ReplicaRefused(f"replica on {socket.gethostname()} refused to start: {error}") from None
        context = serve.get_replica_context()
        self.app_name = context.app_name
        replica = f"{context.deployment}#{context.replica_id.unique_id}"
        self.where = {"replica": replica, "node": ray.util.get_node_ip_address()}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="generation")  # one job at a time
        self._ingress: Any = None
        log.info("replica %s (pid %s) serves %s on %s", self.where["replica"], os.getpid(),
                 self.pipe.manifest.model_name, self.pipe.provider)  # fmt: skip

    async def generate(self, task_id: str, plan: Plan) -> AsyncIterator[tuple[str, Any]]:
        """Run one job; a cancelled stream (the client left) stops it at its next step."""
        cancel, abandoned = threading.Event(), threading.Event()
        latest: dict[str, ProgressUpdate] = {}
        job = asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, task_id, plan, latest, cancel, abandoned
        )
        try:
            yield STARTED, {"provider": self.pipe.provider}
            while True:
                done, _ = await asyncio.wait({job}, timeout=POLL_SECONDS)
                if "update" in latest:
                    yield PROGRESS, latest.pop("update")
                if done:
                    break
                if not cancel.is_set() and await self._interrupted(task_id):
                    cancel.set()
            yield DONE, job.result()
        except (asyncio.CancelledError, GeneratorExit):
            abandoned.set()
            cancel.set()
            raise

    def _run(
        self, task_id: str, plan: Plan, latest: dict, cancel: threading.Event, abandoned: threading.Event
    ) -> JobResult | JobFailure:
        def report(update: ProgressUpdate) -> None:
            latest["update"] = update

        try:
            result = run_plan(self.pipe, plan, report, cancel, abandoned.is_set)
        except Exception as error:
            return failure_for(error, task_id)
        finally:
            release_if_large(self.pipe, plan, task_id)
        result.where = dict(self.where)
        return result

    async def _interrupted(self, task_id: str) -> bool:
        """Ask the ingress; if it cannot answer, the job goes on (an interrupt is only a wish)."""
        try:
            if self._ingress is None:
                self._ingress = serve.get_deployment_handle(INGRESS, app_name=self.app_name)
            return bool(await self._ingress.interrupt_requested.remote(task_id))
        except Exception as error:  # the ingress restarting: try again at the next poll
            log.debug("could not ask the ingress about %s: %s", task_id, error)
            return False
