"""`python -m runtime.cluster --model DIR --replicas N` (or `--model-dir DIR`): the A1111 API on a Ray Serve cluster.

Without `--address`, a local Ray starts on this machine (as `ray.init()` does); `--address auto`
joins the cluster that `ray start` made here, `ray://HOST:10001` a remote one. The command serves
until Ctrl-C, then removes its application. Bad arguments, a bad model folder or a deployment that
cannot start print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..options import Parser, positive, positive_number
from ..server.__main__ import TRAFFIC, _is_loopback, add_api_options, build_config
from .model_check import reference_models
from .settings import ClusterSettings, Scaling

log = logging.getLogger("runtime.cluster")
DEFAULT_SCALING = Scaling()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m runtime.cluster",
        description="The A1111-compatible txt2img API on a Ray Serve cluster: one Pipeline per replica, no torch.",
    )
    add = parser.add_argument
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="exported folder, at this path on every node")
    which.add_argument(
        "--model-dir", type=Path, help="serve every exported folder in DIR (at this path on every node) with Serve's "
        "model multiplexing: each job goes to a replica that holds its checkpoint",
    )  # fmt: skip
    add(
        "--models-per-replica", type=positive, default=1,
        help="with --model-dir: checkpoints a replica keeps loaded, least recently used out first (default "
        "%(default)s, as A1111 keeps one)",
    )  # fmt: skip
    add("--replicas", type=positive, default=1, help="Pipeline replicas (with autoscaling: the initial count)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpus-per-replica", type=positive_number, help="GPUs per replica (default 1; 0.5 shares one)")
    where.add_argument("--cpus-per-replica", type=positive, help="CPU replicas: this many cores and ORT threads each")
    add("--address", help="Ray cluster: auto (started with `ray start`), ray://HOST:PORT; default: a local Ray")
    add("--min-replicas", type=positive, help="autoscaling floor (default 1; needs --max-replicas)")
    add("--max-replicas", type=positive, help="turn on autoscaling up to this many replicas")
    add(
        "--target-ongoing-requests", type=positive_number, default=DEFAULT_SCALING.target_ongoing_requests,
        help="autoscaling target per replica: running + waiting jobs (default %(default)s)",
    )  # fmt: skip
    add_api_options(parser)
    parser.set_defaults(max_active_requests=None)  # default: room for every job the replicas can hold
    args = parser.parse_args(argv)
    if args.min_replicas is not None and args.max_replicas is None:
        parser.error("--min-replicas needs --max-replicas (autoscaling)")
    if args.max_replicas is not None and not (args.min_replicas or 1) <= args.replicas <= args.max_replicas:
        parser.error("--replicas must lie between --min-replicas and --max-replicas")
    return args


def settings_from_args(argv: list[str]) -> ClusterSettings:
    """Settings from command-line style arguments, checked; also used by the Serve config builder."""
    return build_settings(parse_args(argv))


def build_settings(args: argparse.Namespace) -> ClusterSettings:
    """The settings, with every checkpoint read and fingerprinted here (the reference copies)."""
    if args.max_active_requests is None:
        # The ingress holds every running and waiting job: Serve's queue must fill before the guard refuses.
        most = max(args.replicas, args.max_replicas or 0)
        args.max_active_requests = most * (args.queue_size + 1) + TRAFFIC.max_active_requests
    server = build_config(args)
    scaling = Scaling(
        min_replicas=args.min_replicas or 1, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
    )  # fmt: skip
    cpu = args.cpus_per_replica is not None
    return ClusterSettings(
        server=server, replicas=args.replicas, gpus_per_replica=0.0 if cpu else (args.gpus_per_replica or 1.0),
        cpus_per_replica=float(args.cpus_per_replica) if cpu else 1.0, scaling=scaling,
        models=reference_models(server), models_per_replica=args.models_per_replica,
    )  # fmt: skip


def _check_room(settings: ClusterSettings) -> None:
    import ray

    if settings.gpus_per_replica > 0 and not ray.cluster_resources().get("GPU"):
        raise UserError("this Ray cluster has no GPU: give --cpus-per-replica K for CPU replicas")


def start_ray(address: str | None, **options: Any) -> None:
    """Join the Ray cluster at `address`, or start a local one without Ray's dashboard UI (nothing
    listens on its port 8265). Ray 2.60 still starts its API-server process (dashboard.py, with
    `--disable-frontend` and only the usage-stats module, which reports nothing unless
    RAY_USAGE_STATS_ENABLED=1) and the per-node dashboard agent: Ray offers no switch for them.
    A new local cluster turns on Ray's token authentication and keeps the token in
    ~/.ray/auth_token (docs/cluster.md). `options` go to ray.init (tests: num_cpus)."""
    import ray

    dashboard = False if address is None else None  # a cluster made elsewhere keeps its own choice
    ray.init(address=address, include_dashboard=dashboard, logging_level=logging.WARNING, **options)


def serve_until_stopped(settings: ClusterSettings, address: str | None) -> None:
    import ray
    from ray import serve

    from .app import deploy

    start_ray(address)
    try:
        _check_room(settings)
        deploy(settings)
        if not _is_loopback(settings.server.host) and not settings.server.credentials:
            log.warning("listening on %s without --api-auth: anyone who reaches it can use the replicas",
                        settings.server.host)  # fmt: skip
        log.info("serving %s on http://%s:%s with %s replicas", settings.server.model or settings.server.model_dir,
                 settings.server.host, settings.server.port, settings.replicas)  # fmt: skip
        stop = threading.Event()
        for sign in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sign, lambda *_: stop.set())
        stop.wait()
    finally:
        try:
            serve.delete(settings.app_name)
        except Exception as error:  # Serve already gone (a local Ray shutting down)
            log.debug("could not delete the application: %s", error)
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = build_settings(args)
        serve_until_stopped(settings, args.address)
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        extra = "pip install '.[server,cluster]'"
        print(f"error: {error.name or error}: install the cluster extra: {extra}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
