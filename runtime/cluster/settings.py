"""What a cluster deployment is made of: the server's settings plus replicas, resources and scaling.

Defaults suit one GPU per replica: one generation at a time on each (a Pipeline is not
thread-safe, and a second job would only share the GPU), scale up when about one job waits per
replica, scale down slowly (a replica takes tens of seconds to load and check the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..server.config import ServerConfig

APP_NAME = "acertain"
INGRESS_MAX_ONGOING = 1000  # the ingress only checks and forwards: it holds many waiting requests at once


@dataclass(frozen=True)
class Scaling:
    """Serve autoscaling, used when max_replicas is set; otherwise the replica count is fixed."""

    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # per replica: one running + about one waiting
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0  # a GPU replica is slow to bring back: keep it a while


@dataclass(frozen=True)
class ModelCopy:
    """One checkpoint the replicas may load: its folder (the same path on every node), its name in
    the --model-dir listing, and the reference copy's fingerprint (model_check.fingerprint)."""

    folder: str
    filename: str
    fingerprint: str | None = None  # None: not compared


@dataclass(frozen=True)
class ClusterSettings:
    server: ServerConfig  # model, host, port, auth, limits; queue_size counts waiting jobs per replica
    replicas: int = 1
    gpus_per_replica: float = 0.0  # 0: CPU replicas
    cpus_per_replica: float = 1.0
    scaling: Scaling = field(default_factory=Scaling)
    # Checkpoint title -> its copy: Serve's multiplexed model ids. The first is the current one at start.
    models: dict[str, ModelCopy] = field(default_factory=dict)
    models_per_replica: int = 1  # checkpoints a replica keeps loaded (Serve's max_num_models_per_replica)
    app_name: str = APP_NAME

    @property
    def preload(self) -> str | None:
        """The model a replica loads before Serve counts it ready: the one `--model` (with
        --model-dir a replica loads what its first jobs ask for)."""
        return next(iter(self.models)) if not self.server.model_dir else None

    @property
    def provider(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"

    @property
    def threads(self) -> int | None:
        """onnxruntime threads: the CPUs Ray gives the replica (GPU replicas: onnxruntime's default)."""
        return None if self.gpus_per_replica > 0 else max(1, int(self.cpus_per_replica))

    @property
    def most_replicas(self) -> int:
        return max(self.replicas, self.scaling.max_replicas or 0)

    @property
    def max_queued_requests(self) -> int:
        """Serve's queue at the ingress's handle: `queue_size` waiting jobs per replica."""
        return self.server.queue_size * self.most_replicas

    def generator_options(self) -> dict[str, Any]:
        """Serve deployment options of the Generator (one Pipeline per replica)."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": 1,  # one generation at a time per replica; the rest wait in Serve's queue
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": 10,
            "health_check_timeout_s": 30,
            "graceful_shutdown_timeout_s": 20,
            # A replica that refuses to start (bad path, damaged copy) fails the deployment quickly.
            "max_constructor_retry_count": max(2, self.replicas),
        }
        if self.scaling.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            scaling = self.scaling
            options["autoscaling_config"] = {
                "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                "initial_replicas": self.replicas, "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            }  # fmt: skip
        return options

    def ingress_options(self) -> dict[str, Any]:
        return {
            "num_replicas": 1,  # task ids, progress and interrupts live in its process
            "ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": INGRESS_MAX_ONGOING,
            "max_queued_requests": INGRESS_MAX_ONGOING,
        }
