"""The checkpoints one server serves: `--model DIR` (one) or `--model-dir DIR` (every export in it).

A1111 lists checkpoints as "name [hash]" (`/sdapi/v1/sd-models`), switches the one requests use
with `POST /options {"sd_model_checkpoint"}` and lets a request pick another for itself
(`override_settings`). Here:

- `Checkpoint` is one export folder and what A1111 shows of it. Its hash is the source
  checkpoint's (sha256 of the file, as A1111 computes it, recorded at export), else a digest of
  the export's own graph hashes, so that two exports of one diffusers folder are told apart.
- `ModelSet` knows every checkpoint, the current one, and plans requests against any of them
  without loading it (a `Planner` per folder, cheap). Loaded `Pipeline`s live in a pool: the
  current one always, the others least-recently-used while what loading each cost (the growth of
  resident memory, as LoRA sessions are charged) fits `cache_bytes`.

Loading and unloading run on the generation worker's thread (one box), between jobs: A1111 also
switches checkpoints under its queue lock, so a switch waits for the running job.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError, ModelFolderError
from ..graphs.lora import resident_growth
from ..graphs.model_folder import MANIFEST_FILE, Manifest, read_manifest
from ..graphs.sessions import trim_c_heap
from ..graphs.vaes import resolve_vae

if TYPE_CHECKING:
    from ..pipeline import Pipeline, Planner
    from .mapping import PlanModel

log = logging.getLogger(__name__)
HASH_LENGTH = 10  # A1111's short hash: sha256[:10]


@dataclass(frozen=True)
class Checkpoint:
    """One export folder, as A1111 lists a checkpoint file."""

    manifest: Manifest
    filename: str  # relative to --model-dir (never an absolute path: it tells a caller about the box)

    @property
    def folder(self) -> Path:
        return self.manifest.folder

    @property
    def model_name(self) -> str:
        return self.manifest.model_name

    @property
    def sha256(self) -> str:
        """The source checkpoint's sha256 if the export recorded it, else the export's digest."""
        recorded = self.manifest.raw.get("model_sha256")
        if isinstance(recorded, str) and recorded:
            return recorded
        graphs = sorted(f"{name}:{info.sha256}" for name, info in self.manifest.graphs.items())
        return hashlib.sha256("\n".join(graphs).encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.manifest.model_hash or self.sha256[:HASH_LENGTH]

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.short_hash}]"

    def names(self) -> set[str]:
        """What a client may call it by, as A1111's checkpoint_aliases: the title, the name, the
        file name, the short hash and the sha256."""
        return {self.title, self.model_name, self.filename, self.short_hash, self.sha256}

    def listing(self) -> dict[str, Any]:
        """GET /sdapi/v1/sd-models' entry."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash, "sha256": self.sha256,
                "filename": self.filename, "config": None}  # fmt: skip


def scan_folder(model_dir: Path) -> list[Checkpoint]:
    """Every export folder in `model_dir` (at any depth), sorted by title; folders that are not a
    complete export are logged and left out, as A1111 skips files it cannot list."""
    if not model_dir.is_dir():
        raise ModelFolderError(f"--model-dir {model_dir} is not a folder")
    found: dict[str, Checkpoint] = {}
    for manifest_file in sorted(model_dir.rglob(MANIFEST_FILE)):
        folder = manifest_file.parent
        try:
            checkpoint = Checkpoint(read_manifest(folder), folder.relative_to(model_dir).as_posix())
        except ModelFolderError as error:
            log.warning("skipping %s: %s", folder, error)
            continue
        if checkpoint.title in found:
            log.warning("skipping %s: %s has the same title", folder, found[checkpoint.title].filename)
            continue
        found[checkpoint.title] = checkpoint
    return [found[title] for title in sorted(found)]


class PipelinePool:
    """Loaded Pipelines by title: the pinned one (the current checkpoint) always kept, the others
    least recently used first while their charges total at most `cache_bytes`. A pipeline a job
    still uses stays alive after eviction until the job ends (the job holds a reference)."""

    def __init__(self, load: Callable[[Checkpoint], Pipeline], cache_bytes: int) -> None:
        self._load = load
        self.cache_bytes = cache_bytes
        self._loaded: OrderedDict[str, tuple[Pipeline, int]] = OrderedDict()
        self._lock = threading.RLock()

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def peek(self, title: str) -> Pipeline | None:
        with self._lock:
            entry = self._loaded.get(title)
            return entry[0] if entry is not None else None

    def adopt(self, title: str, pipe: Pipeline) -> None:
        """A pipeline loaded elsewhere (the server's start) joins the pool, charged nothing."""
        with self._lock:
            self._loaded[title] = (pipe, 0)

    def get(self, checkpoint: Checkpoint, pinned: str | None) -> Pipeline:
        """The loaded pipeline, loading it (after making room) if needed."""
        with self._lock:
            entry = self._loaded.get(checkpoint.title)
            if entry is not None:
                self._loaded.move_to_end(checkpoint.title)
                return entry[0]
            estimate = sum(path.stat().st_size for path in checkpoint.folder.rglob("*") if path.is_file())
            self._evict_until(self.cache_bytes - estimate, keep={pinned})
            log.info("loading checkpoint %s", checkpoint.title)
            pipe, charge = resident_growth(lambda: self._load(checkpoint), estimate)
            self._loaded[checkpoint.title] = (pipe, charge)
            self._evict_until(self.cache_bytes, keep={pinned, checkpoint.title} - {None})
            if checkpoint.title != pinned and self._charged() > self.cache_bytes:
                self._loaded.pop(checkpoint.title)  # no room to keep it: used by this job, then freed
            return pipe

    def drop(self, keep: set[str | None] | None = None) -> None:
        """Unload every pipeline but those in `keep`."""
        with self._lock:
            for title in [title for title in self._loaded if title not in (keep or set())]:
                self._loaded.pop(title)
                log.info("unloaded checkpoint %s", title)
        trim_c_heap()

    def _charged(self, keep: set[str | None] | None = None) -> int:
        return sum(charge for title, (_, charge) in self._loaded.items() if title not in (keep or set()))

    def _evict_until(self, limit: int, keep: set[str | None]) -> None:
        evicted = False
        for title in list(self._loaded):
            if self._charged(keep) <= limit:
                break
            if title not in keep:
                self._loaded.pop(title)
                log.info("evicted checkpoint %s from the models cache", title)
                evicted = True
        if evicted:
            trim_c_heap()


class ModelSet:
    """Every checkpoint, the current one (A1111's sd_model_checkpoint), their planners and, on
    one box, the pool of loaded pipelines. `model_dir` None: the one `--model` folder."""

    def __init__(
        self,
        checkpoints: list[Checkpoint],
        make_planner: Callable[[Checkpoint], Planner],
        pool: PipelinePool | None = None,
        model_dir: Path | None = None,
    ) -> None:
        if not checkpoints:
            raise ModelFolderError(f"no exported model folder (with a {MANIFEST_FILE}) in {model_dir}")
        self._checkpoints = {checkpoint.title: checkpoint for checkpoint in checkpoints}
        self._make_planner = make_planner
        self._planners: dict[str, Planner] = {}
        self.pool = pool
        self.model_dir = model_dir
        self.current = checkpoints[0].title
        self._lock = threading.Lock()

    def checkpoints(self) -> list[Checkpoint]:
        return list(self._checkpoints.values())

    def find(self, name: str) -> Checkpoint | None:
        """A checkpoint by any of A1111's names for it (the title first: names may repeat)."""
        exact = self._checkpoints.get(name)
        if exact is not None:
            return exact
        return next((checkpoint for checkpoint in self._checkpoints.values() if name in checkpoint.names()), None)

    def checkpoint(self, name: str | None = None, field: str = "override_settings.sd_model_checkpoint") -> Checkpoint:
        """The named checkpoint (None: the current one); an unknown name is a 422 naming `field`."""
        found = self._checkpoints.get(self.current) if name is None else self.find(name)
        if found is None:
            available = ", ".join(self._checkpoints)
            raise InvalidRequestError(field, f"model {name!r} not found; available: {available}")
        return found

    def planner(self, checkpoint: Checkpoint | None = None) -> PlanModel:
        """What checks requests for a checkpoint: its loaded pipeline, else its (session-less) planner."""
        checkpoint = checkpoint or self.checkpoint()
        loaded = self.pool.peek(checkpoint.title) if self.pool is not None else None
        if loaded is not None:
            return loaded
        with self._lock:
            if checkpoint.title not in self._planners:
                self._planners[checkpoint.title] = self._make_planner(checkpoint)
            return self._planners[checkpoint.title]

    def pipeline(self, title: str | None) -> Pipeline:
        """The loaded pipeline for a checkpoint (None: the current one); worker thread only."""
        if self.pool is None:
            raise RuntimeError("this front runs no pipelines")
        return self.pool.get(self.checkpoint(title), pinned=self.current)

    def switch(self, title: str) -> None:
        """Make `title` current, loaded (A1111 answers POST /options once the model is loaded)."""
        if self.pool is not None:
            self.pool.get(self._checkpoints[title], pinned=title)
        self.current = title

    def unload(self) -> None:
        """A1111's /unload-checkpoint: every loaded checkpoint leaves memory; the next job loads again."""
        if self.pool is not None:
            self.pool.drop()

    def reload(self) -> None:
        """A1111's /reload-checkpoint: the current checkpoint loaded again if it was unloaded."""
        if self.pool is not None:
            self.pipeline(None)

    def refresh(self) -> None:
        """A1111's /refresh-checkpoints: list --model-dir again (loaded pipelines stay)."""
        if self.model_dir is None:
            return
        found = scan_folder(self.model_dir)
        with self._lock:
            self._checkpoints = {checkpoint.title: checkpoint for checkpoint in found} or self._checkpoints
            self._planners = {title: planner for title, planner in self._planners.items() if title in self._checkpoints}
        if self.current not in self._checkpoints:
            self.current = next(iter(self._checkpoints))

    @classmethod
    def around(cls, pipe: Pipeline, config: Any) -> ModelSet:
        """One box serving one loaded pipeline (`--model`, or a test's): it is current, and loads
        again with the server's options after /unload-checkpoint."""
        models = cls(single(pipe.manifest), planner_maker(config), PipelinePool(pipeline_loader(config), 0))
        models.pool.adopt(models.current, pipe)  # type: ignore[union-attr]
        return models

    def provider(self) -> str:
        loaded = self.pool.peek(self.current) if self.pool is not None else None
        return loaded.provider if loaded is not None else "none loaded"

    def provider_choice(self) -> str:
        """What runs the current checkpoint and why (Pipeline.provider_choice): the line at start."""
        loaded = self.pool.peek(self.current) if self.pool is not None else None
        return loaded.provider_choice if loaded is not None else "none loaded"


def default_vae(manifest: Manifest, vae: str | None) -> str | None:
    """--vae for the checkpoints that have it; the others decode with their own VAE."""
    try:
        return resolve_vae(manifest, vae)
    except InvalidRequestError:
        log.warning("%s has no VAE %r: its own VAE is its default", manifest.folder.name, vae)
        return None


def single(manifest: Manifest) -> list[Checkpoint]:
    return [Checkpoint(manifest, manifest.folder.name)]


def planner_maker(config: Any) -> Callable[[Checkpoint], Planner]:
    """Planners (no sessions) with the server's add-on folders and --vae where a checkpoint has it."""
    from ..pipeline import Planner

    def make(checkpoint: Checkpoint) -> Planner:
        vae = default_vae(checkpoint.manifest, config.vae)
        return Planner.from_folder(checkpoint.folder, config.lora_dir, config.embeddings_dir, vae)

    return make


def pipeline_loader(config: Any) -> Callable[[Checkpoint], Pipeline]:
    """Pipelines loaded with the server's options (runtime.options.LOAD_OPTIONS)."""
    from ..options import load_options
    from ..pipeline import Pipeline

    def load(checkpoint: Checkpoint) -> Pipeline:
        options = {**load_options(config), "vae": default_vae(checkpoint.manifest, config.vae)}
        return Pipeline.from_pretrained(checkpoint.folder, **options)

    return load
