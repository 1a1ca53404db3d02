"""The Serve application: the server's FastAPI app as ingress, in front of the Generator replicas.

`build_application(settings)` is what `python -m runtime.cluster` runs; `build(args)` is the same
for Serve config files (`import_path: runtime.cluster.app:build`, see docs/cluster.md).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from ray import serve
from ray.serve import Application

from ..errors import UserError
from ..graphs.model_folder import read_manifest
from ..pipeline import Planner
from ..server.app import build_app
from ..server.models import Checkpoint, ModelSet, planner_maker
from .backend import GENERATOR, ServeBackend
from .generator import INGRESS, Generator
from .settings import ClusterSettings

log = logging.getLogger("runtime.cluster")


class DeploymentFailed(UserError):
    """The application did not start (a replica refused the model, or Serve gave up)."""


@serve.ingress()
class Ingress:
    """The HTTP front: the one-box server's app, with Serve replicas as its backend."""

    def __init__(self, generator: Any, settings: ClusterSettings) -> None:
        # Requests are checked here, once, as on one box: LoRA names and shapes against the model,
        # embeddings matched in prompts (their vectors travel with the job). No ONNX session.
        # With --model-dir every checkpoint gets a planner when a request first names it. The list is
        # the one fingerprinted at deployment: replicas can check no other, so /refresh-checkpoints
        # changes nothing here (ModelSet without model_dir); redeploy to serve new exports.
        server = settings.server
        checkpoints = [Checkpoint(read_manifest(copy.folder), copy.filename) for copy in settings.models.values()]
        make_planner = planner_maker(server)
        if not server.model_dir:  # one model: planned now, so a bad --vae stops the deployment, as today
            planner = Planner.from_folder(server.model, server.lora_dir, server.embeddings_dir, server.vae)
            make_planner = lambda _: planner  # noqa: E731
        self.models = ModelSet(checkpoints, make_planner)
        self.settings = settings
        self.backend = ServeBackend(generator, settings)

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.models, self.settings.server, self.backend)

    def interrupt_requested(self, task_id: str) -> bool:
        """Asked by the replica running `task_id` while it runs (not an HTTP route)."""
        return self.backend.interrupt_requested(task_id)


def build_application(settings: ClusterSettings) -> Application:
    generator = serve.deployment(Generator, name=GENERATOR).options(**settings.generator_options())
    ingress = serve.deployment(Ingress, name=INGRESS).options(**settings.ingress_options())
    return ingress.bind(generator.bind(settings), settings)


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder (`import_path: runtime.cluster.app:build`): the command line's
    options as `args` keys with underscores (model, replicas, cpus_per_replica, ...)."""
    from .__main__ import settings_from_args

    return build_application(settings_from_args(_arguments(args)))


def _arguments(args: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv


def deploy(settings: ClusterSettings, route_prefix: str = "/", timeout_s: float = 900.0) -> Any:
    """Start Serve's HTTP proxies on host:port, deploy, and wait until every replica took its model.
    Raises DeploymentFailed with one line (the replica's own reason) if the app cannot start."""
    serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
    try:
        handle = serve.run(build_application(settings), name=settings.app_name, route_prefix=route_prefix)
    except RuntimeError as error:
        raise DeploymentFailed(_failure_reason(settings.app_name, str(error))) from None
    _wait_ready(settings, timeout_s)
    return handle


def _failure_reason(app_name: str, error: str) -> str:
    """serve.run says only which deployment failed; the replica's reason is in its status message."""
    try:
        app = serve.status().applications[app_name]
        messages = [deployment.message for deployment in app.deployments.values()] + [app.message]
    except Exception as status_error:  # the controller itself failing: keep serve.run's words
        log.debug("no status for %s: %s", app_name, status_error)
        messages = []
    return one_line("\n".join([*messages, error]))


def _wait_ready(settings: ClusterSettings, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(settings.app_name)
        states = app.deployments[GENERATOR].replica_states if app else {}
        if states.get("RUNNING", 0) >= min(settings.replicas, settings.scaling.max_replicas or settings.replicas):
            return
        time.sleep(1)
    raise DeploymentFailed(f"the replicas were not all ready after {timeout_s:.0f} s (is there room for them?)")


_REASON = re.compile(r"(?:ReplicaRefused|ModelFolderError|UserError)\w*: (.+)")


def one_line(message: str) -> str:
    """Serve's failure message holds the replica's traceback: keep our own reason, if it is there."""
    reasons = _REASON.findall(message)
    if reasons:
        return reasons[-1].strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "the deployment failed; see the Ray Serve logs"
