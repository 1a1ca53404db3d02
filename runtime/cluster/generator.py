"""The replica: the Pipelines of the checkpoints its jobs name, through Serve's model multiplexing.

Each job comes with its checkpoint's title as Serve's multiplexed model id; Serve routes it to a
replica that holds that model when one is free, and the replica's `@serve.multiplexed` loader
checks the checkpoint's hashes and loads it on first use, keeping `models_per_replica` of them
(least recently used out). With `--model` the one checkpoint is checked and loaded in the
constructor, so Serve counts a replica as starting until its model is ready, as before.
`generate` runs one validated job (the server's `run_plan`) on a thread and streams what the
ingress needs back to it: where it runs, progress with the preview latents, then the result (or
the error answer). Interrupts travel the other way by polling the ingress, the one process that
knows which task a client interrupted.
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
REPLICA_RETRY_AFTER = 5  # another replica (another node's copy) may load the checkpoint

# Stream events: (kind, payload).
STARTED, PROGRESS, DONE = "started", "progress", "done"


class ReplicaRefused(UserError):
    """A replica cannot serve this model (bad path, damaged or different copy): the deployment fails
    with this one line."""


class Generator:
    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self._preloaded: dict[str, Pipeline] = {}
        if settings.preload is not None:
            try:
                self._preloaded[settings.preload] = self._load(settings.preload)
            except UserError as error:
                raise ReplicaRefused(f"replica on {socket.gethostname()} refused to start: {error}") from None

        async def load(model_id: str) -> Pipeline:
            """Serve's loader: what the constructor loaded, else checked and loaded off the event loop."""
            return self._preloaded.pop(model_id, None) or await asyncio.to_thread(self._load, model_id)

        # An instance attribute, so that the bound comes from the settings (Serve detects it at start).
        self.get_model = serve.multiplexed(max_num_models_per_replica=settings.models_per_replica)(load)
        context = serve.get_replica_context()
        self.app_name = context.app_name
        replica = f"{context.deployment}#{context.replica_id.unique_id}"
        self.where = {"replica": replica, "node": ray.util.get_node_ip_address()}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="generation")  # one job at a time
        self._ingress: Any = None
        log.info("replica %s (pid %s) serves %s", self.where["replica"], os.getpid(), ", ".join(settings.models))

    def _load(self, title: str) -> Pipeline:
        """The checkpoint's Pipeline, after checking this node's copy against the reference one."""
        copy = self.settings.models.get(title)
        if copy is None:  # the ingress only sends the titles it was deployed with
            raise ReplicaRefused(f"this deployment has no checkpoint {title!r}")
        check_model(copy.folder, copy.fingerprint)
        server = self.settings.server
        log.info("loading checkpoint %s from %s", title, copy.folder)
        # No embeddings folder: the ingress matched the prompts, and the vectors come with the plan.
        return Pipeline.from_pretrained(
            copy.folder, provider=self.settings.provider, threads=self.settings.threads, lora_dir=server.lora_dir,
            lora_cache_mb=server.lora_cache_mb,
        )  # fmt: skip

    async def generate(self, task_id: str, plan: Plan) -> AsyncIterator[tuple[str, Any]]:
        """Run one job on its checkpoint (loaded first if this replica does not hold it); a
        cancelled stream (the client left) stops it at its next step."""
        try:
            pipe = await self.get_model(serve.get_multiplexed_model_id() or next(iter(self.settings.models)))
        except UserError as error:  # a copy that differs, or a damaged one: this job's answer, in one line
            log.error("replica %s cannot load %s: %s", self.where["replica"], plan.model, error)
            message = f"replica on {socket.gethostname()}: {error}"
            yield DONE, JobFailure(503, "ModelUnavailable", message, retry_after=REPLICA_RETRY_AFTER)
            return
        cancel, abandoned = threading.Event(), threading.Event()
        latest: dict[str, ProgressUpdate] = {}
        job = asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, pipe, task_id, plan, latest, cancel, abandoned
        )
        try:
            yield STARTED, {"provider": pipe.provider}
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
        self, pipe: Pipeline, task_id: str, plan: Plan, latest: dict, cancel: threading.Event,
        abandoned: threading.Event,
    ) -> JobResult | JobFailure:  # fmt: skip
        def report(update: ProgressUpdate) -> None:
            latest["update"] = update

        try:
            result = run_plan(pipe, plan, report, cancel, abandoned.is_set)
        except Exception as error:
            return failure_for(error, task_id)
        finally:
            release_if_large(pipe, plan, task_id)
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
