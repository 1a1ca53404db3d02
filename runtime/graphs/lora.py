"""kohya / A1111 LoRAs applied at serving time, without re-exporting and without torch.

The exporter wrote, beside the text encoder and UNet graphs, `lora_targets.json`: for every weight
a LoRA can change (kohya module name), the initializer(s) it became, how it sits there (transposed
for MatMul, a slice of a fused Q/K/V tensor) and where the initializer's bytes are on disk. For a
set of LoRAs with multipliers this module computes, per touched initializer,

    W' = W + sum_i m_i * (alpha_i / rank_i) * up_i @ down_i     (float32, then the graph's dtype)

(kohya's rule; conv layers as LyCORIS LoCon store them: a k x k `down`, a 1 x 1 `up`), and the
sessions of the graphs it touches are built again with those tensors in place of the stored ones
(onnxruntime's SessionOptions.add_initializer). Switching the LoRA set thus costs at most one
rebuild of the text-encoder and UNet sessions; recently used sets keep their sessions, within a
memory bound (LoraSessions). Checking a request's LoRAs needs no session (LoraResolver).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError, ModelFolderError
from ..limits import LORA_CACHE_MB
from ..text.extra_networks import LoraUse
from .model_folder import OPENVINO_TARGET, Manifest
from .safetensors_io import SafetensorsError, SafetensorsFile
from .sessions import GraphSession, InitializerOverrides, Sessions, UNetSession, trim_c_heap

log = logging.getLogger(__name__)

LORA_TARGETS_FILE = "lora_targets.json"
LORA_GRAPHS = ("text_encoder", "unet")
PREFIX_GRAPH = {"lora_te_": "text_encoder", "lora_unet_": "unet"}
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
MAX_LORA_BYTES = 2 * 2**30  # SD1 LoRAs are 2-300 MB; a full checkpoint mistaken for one is refused
DEFAULT_CACHE_BYTES = LORA_CACHE_MB * 2**20
FILE_CACHE_BYTES = 2**30  # read LoRA files kept for the next request (a cluster's ingress only checks them)
KEY_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
CONVERT_HINT = (
    "pickled LoRA files are not read by the runtime (they can run code); convert it once with torch: "
    "python -c \"import torch,safetensors.torch as s; d=torch.load('F.pt',weights_only=True); "
    "s.save_file({k:v.contiguous() for k,v in d.items()},'F.safetensors')\""
)


@dataclass(frozen=True)
class LoraModule:
    down: np.ndarray  # (rank, in[, kh, kw])
    up: np.ndarray  # (out, rank[, 1, 1])
    alpha: float

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """(alpha/rank) * up @ down in the target weight's shape."""
        rank = self.down.shape[0]
        product = self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(rank, -1)
        return (product * np.float32(self.alpha / rank)).reshape(shape)


@dataclass
class LoraFile:
    name: str
    path: Path
    shorthash: str  # A1111's: first 12 hex digits of the addnet hash
    modules: dict[str, LoraModule]

    @property
    def nbytes(self) -> int:
        return sum(module.down.nbytes + module.up.nbytes for module in self.modules.values())


@dataclass
class GraphTargets:
    """One graph's lora_targets.json."""

    folder: Path
    graph_file: str  # model.onnx: initializers stored there are inline, the others external
    modules: dict[str, list[dict[str, Any]]]
    absent: set[str]
    initializers: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, graph_path: Path) -> GraphTargets | None:
        """The side file beside the graph at `graph_path`; None for exports made without one."""
        graph_folder = graph_path.parent
        path = graph_folder / LORA_TARGETS_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(graph_folder, graph_path.name, raw["modules"], set(raw.get("absent", [])), raw["initializers"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelFolderError(f"{path} is unreadable ({error}); re-export the model") from None

    def base(self, name: str) -> np.ndarray:
        entry = self.initializers[name]
        dtype = np.dtype(entry["dtype"])
        count = entry["length"] // dtype.itemsize
        with (self.folder / entry["file"]).open("rb") as handle:
            handle.seek(entry["offset"])
            data = np.frombuffer(handle.read(entry["length"]), dtype=dtype, count=count)
        return data.reshape(entry["shape"])

    def _work(self, uses: list[tuple[LoraFile, float]]) -> dict[str, list[tuple[LoraModule, float, dict[str, Any]]]]:
        """Per initializer, the LoRA modules that change it, with their multipliers and slots."""
        work: dict[str, list[tuple[LoraModule, float, dict[str, Any]]]] = {}
        for lora, multiplier in uses:
            for module_name, module in lora.modules.items():
                for slot in self.modules.get(module_name, []) if multiplier else []:
                    work.setdefault(slot["initializer"], []).append((module, multiplier, slot))
        return work

    def touches(self, uses: list[tuple[LoraFile, float]]) -> bool:
        """Whether these LoRAs at these multipliers change any weight of this graph."""
        return bool(self._work(uses))

    def patch(self, uses: list[tuple[LoraFile, float]]) -> InitializerOverrides:
        """Patched initializers for LoRAs with their multipliers (modules of other graphs ignored).
        One initializer at a time in float32, so the peak is one weight's float32 copy on top of
        the patched set in the graph's dtype."""
        overrides = InitializerOverrides()
        for name, items in self._work(uses).items():
            value = self.base(name).astype(np.float32)
            for module, multiplier, slot in items:
                delta = module.delta(tuple(slot["shape"])) * np.float32(multiplier)
                part = value.reshape(slot["view"])[tuple(slice(None) if i is None else i for i in slot["index"])]
                if slot["transposed"]:
                    delta = delta.reshape(delta.shape[0], -1).T
                if slot.get("channels_last"):  # (out, in, kh, kw) stored as (out, kh, kw, in); older side files lack it
                    delta = delta.transpose(0, 2, 3, 1)
                part += delta.reshape(part.shape)
            entry = self.initializers[name]
            target = overrides.inline if entry["file"] == self.graph_file else overrides.external
            target[name] = value.astype(entry["dtype"])
        return overrides

    def check(self, lora: LoraFile, graph: str) -> None:
        for module_name, module in lora.modules.items():
            if graph_of(module_name) != graph:
                continue
            slots = self.modules.get(module_name)
            if slots is None:
                if module_name in self.absent:
                    continue
                raise InvalidRequestError(
                    "lora", f"LoRA {lora.name!r} targets {module_name}, which this model does not have "
                    "(a LoRA for another architecture, e.g. SDXL or SD2?)"
                )  # fmt: skip
            rows, columns = module.up.shape[0], int(np.prod(module.down.shape[1:]))
            shape = slots[0]["shape"]
            if rows != shape[0] or columns != int(np.prod(shape[1:])):
                raise InvalidRequestError(
                    "lora", f"LoRA {lora.name!r}: {module_name} is {rows}x{columns}, the model's weight is "
                    f"{'x'.join(map(str, shape))} (a LoRA for another architecture?)"
                )  # fmt: skip


def graph_of(module_name: str) -> str | None:
    return next((graph for prefix, graph in PREFIX_GRAPH.items() if module_name.startswith(prefix)), None)


def read_lora(name: str, path: Path, max_bytes: int = MAX_LORA_BYTES) -> LoraFile:
    """A kohya / A1111 `.safetensors` LoRA; every problem is one InvalidRequestError."""
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidRequestError(
            "lora", f"LoRA {name!r} is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit"
        )
    try:
        handle = SafetensorsFile.open(path)
    except SafetensorsError as error:
        raise InvalidRequestError("lora", f"LoRA {name!r} ({path.name}): {error}") from None
    groups: dict[str, dict[str, str]] = {}
    for key in handle.tensors:
        module, _, part = key.partition(".")
        if not any(module.startswith(prefix) for prefix in PREFIX_GRAPH) or part not in KEY_PARTS:
            raise InvalidRequestError(
                "lora", f"LoRA {name!r} has key {key!r}: not a kohya LoRA/LoCon for SD1 (lora_te_*/lora_unet_* with "
                "lora_down/lora_up/alpha); LoHa, LoKr and other LyCORIS types are not supported"
            )  # fmt: skip
        groups.setdefault(module, {})[part] = key
    modules = {}
    for module, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise InvalidRequestError("lora", f"LoRA {name!r}: {module} lacks lora_down or lora_up")
        down, up = handle.read(parts["lora_down.weight"]), handle.read(parts["lora_up.weight"])
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise InvalidRequestError(
                "lora", f"LoRA {name!r}: {module} has mismatched down {down.shape} / up {up.shape}"
            )
        alpha = float(handle.read(parts["alpha"]).reshape(-1)[0]) if "alpha" in parts else float(down.shape[0])
        modules[module] = LoraModule(down, up, alpha)
    if not modules:
        raise InvalidRequestError("lora", f"LoRA {name!r} holds no LoRA weights")
    return LoraFile(name, path, handle.addnet_hash()[:12], modules)


class LoraLibrary:
    """The LoRA folder. Names are file names without the suffix (A1111's), found at refresh();
    files are read only from this folder, by those names (no path in a request reaches elsewhere).
    Files read are kept, most recently used first, while their weights fit `cache_bytes`: a server
    that sees hundreds of LoRAs does not hold them all."""

    def __init__(
        self, folder: str | Path | None, max_bytes: int = MAX_LORA_BYTES, cache_bytes: int = FILE_CACHE_BYTES
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.max_bytes = max_bytes
        self.cache_bytes = cache_bytes
        self._files: dict[str, Path] = {}
        self._loaded: OrderedDict[str, tuple[tuple[int, int], LoraFile]] = OrderedDict()
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        files: dict[str, Path] = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                if path.is_file() and path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
                    files.setdefault(path.stem, path)
        with self._lock:
            self._files = files

    def names(self) -> list[str]:
        return sorted(self._files)

    def entries(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/loras: A1111's {name, alias, path, metadata}."""
        return [
            {"name": name, "alias": name, "path": path.name, "metadata": {}}
            for name, path in sorted(self._files.items())
        ]

    def get(self, name: str) -> LoraFile:
        path = self._files.get(name)
        if path is None or not path.is_file():
            # A1111 lists the folder again when a prompt names a LoRA it does not know (networks.
            # load_networks): a file added (or removed) since the last refresh is found without one.
            # So a cluster's replicas, which no /refresh-loras reaches, find what the ingress found.
            self.refresh()
            path = self._files.get(name)
        if path is None:
            available = ", ".join(self.names()) or "none"
            where = f"in {self.folder}" if self.folder is not None else "(no --lora-dir given)"
            raise InvalidRequestError("lora", f"unknown LoRA {name!r} {where}; available: {available}")
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidRequestError("lora", f"LoRA {name!r} is {path.name}: {CONVERT_HINT}")
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._loaded.get(name)
            if cached is not None and cached[0] == stamp:
                self._loaded.move_to_end(name)
                return cached[1]
        lora = read_lora(name, path, self.max_bytes)
        with self._lock:
            self._loaded[name] = (stamp, lora)
            self._loaded.move_to_end(name)
            while len(self._loaded) > 1 and sum(item.nbytes for _, item in self._loaded.values()) > self.cache_bytes:
                self._loaded.popitem(last=False)
        return lora


@dataclass
class LoraSet:
    sessions: Sessions
    applied: list[tuple[LoraFile, LoraUse]] = field(default_factory=list)
    bytes: int = 0

    def hashes(self) -> str | None:
        """Infotext `Lora hashes`, as A1111 writes it: "name: shorthash, ..." (':' and ',' dropped from names)."""
        parts = [f"{use.name.replace(':', '').replace(',', '')}: {lora.shorthash}" for lora, use in self.applied]
        return ", ".join(parts) or None


class LoraResolver:
    """The LoRAs a request names, read from the library and checked against this model's
    lora_targets.json: no sessions, so a cluster's ingress checks requests with it as one box does."""

    def __init__(self, manifest: Manifest, library: LoraLibrary) -> None:
        self.manifest = manifest
        self.library = library
        self._targets: dict[str, GraphTargets | None] = {}

    def targets(self, graph: str) -> GraphTargets:
        if graph not in self._targets:
            self._targets[graph] = GraphTargets.read(self.manifest.graphs[graph].path)
        found = self._targets[graph]
        if found is None and self.manifest.target == OPENVINO_TARGET:
            raise InvalidRequestError(
                "lora", "LoRAs are applied on the onnxruntime providers only; this model was exported with "
                "--target openvino: export it with --target cpu or cuda to use LoRAs"
            )  # fmt: skip
        if found is None:
            raise InvalidRequestError(
                "lora", f"{self.manifest.folder} was exported without LoRA support (no {graph}/{LORA_TARGETS_FILE}); "
                "re-export it with this version of `python -m export`"
            )  # fmt: skip
        return found

    def resolve(self, uses: list[LoraUse]) -> list[tuple[LoraFile, LoraUse]]:
        """Read and check every LoRA of a request (before any work is queued)."""
        resolved = []
        for use in uses:
            lora = self.library.get(use.name)
            for graph in LORA_GRAPHS:
                self.targets(graph).check(lora, graph)
            resolved.append((lora, use))
        return resolved


class LoraSessions(LoraResolver):
    """Sessions per LoRA set. The plain sessions are always kept; patched sets are rebuilt on first
    use and kept in least-recently-used order while what building them cost (resident_growth)
    totals at most `cache_bytes`. Room is made before a build (for the new set's graph files), so
    a full cache and a new set are not held at once; 0 keeps no patched set (build, use, drop).
    Evicting only drops the cache's reference:
    a generation still running on an evicted set keeps its sessions alive until it ends."""

    def __init__(
        self, manifest: Manifest, base: Sessions, library: LoraLibrary, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        super().__init__(manifest, library)
        self.base = base
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, LoraSet] = OrderedDict()
        self._lock = threading.Lock()

    def hashes(self, uses: list[LoraUse]) -> str | None:
        return LoraSet(self.base, self.resolve(uses)).hashes() if uses else None

    def held_bytes(self) -> int:
        return sum(item.bytes for item in self._cache.values())

    def sessions_for(self, uses: list[LoraUse]) -> LoraSet:
        resolved = self.resolve(uses)
        active = [(lora, use) for lora, use in resolved if use.te_multiplier or use.unet_multiplier]
        if not active:
            return LoraSet(self.base, resolved)
        key = tuple((lora.path, lora.shorthash, use.te_multiplier, use.unet_multiplier) for lora, use in active)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return LoraSet(cached.sessions, resolved, cached.bytes)
            patched = self._patched_graphs(active)
            estimate = self._graph_bytes(patched)
            self._evict_until(self.cache_bytes - estimate)
            sessions, charge = resident_growth(lambda: self._build(patched), estimate)
            if self.cache_bytes > 0:
                self._cache[key] = LoraSet(sessions, [], charge)
                self._evict_until(self.cache_bytes)  # the measured charge may exceed the estimate
        return LoraSet(sessions, resolved, charge)

    def _evict_until(self, limit: int) -> None:
        """Drop least recently used sets until the rest hold at most `limit` bytes."""
        evicted = False
        while self._cache and self.held_bytes() > limit:
            self._cache.popitem(last=False)
            evicted = True
        if evicted:
            trim_c_heap()  # so the next build's resident growth is not hidden by reused freed pages

    def _patched_graphs(self, active: list[tuple[LoraFile, LoraUse]]) -> dict[str, list[tuple[LoraFile, float]]]:
        """The graphs this set changes, with each LoRA's multiplier for that graph (a graph whose
        multipliers are 0, or whose modules no LoRA targets, keeps its plain session)."""
        patched = {}
        for graph in LORA_GRAPHS:
            multiplier = "te_multiplier" if graph == "text_encoder" else "unet_multiplier"
            uses = [(lora, getattr(use, multiplier)) for lora, use in active]
            if self.targets(graph).touches(uses):
                patched[graph] = uses
        return patched

    def _graph_bytes(self, graphs: Iterable[str]) -> int:
        """The graph files' size: what a rebuilt session is expected to hold."""
        folders = [self.manifest.graphs[graph].path.parent for graph in graphs]
        return sum(item.stat().st_size for folder in folders for item in folder.glob("model.onnx*"))

    def _build(self, patched: dict[str, list[tuple[LoraFile, float]]]) -> Sessions:
        base, config = self.base, self.base.config
        graphs: dict[str, GraphSession] = {"text_encoder": base.text_encoder, "unet": base.unet}
        for graph, uses in patched.items():
            overrides = self.targets(graph).patch(uses)
            kind = UNetSession if graph == "unet" else GraphSession
            log.info("building the %s session with %d LoRA-patched weights", graph, len(overrides))
            graphs[graph] = kind(self.manifest.graphs[graph], base.provider, config, overrides)
        return replace(base, text_encoder=graphs["text_encoder"], unet=graphs["unet"])


def resident_bytes() -> int | None:
    """This process's resident memory (Linux: /proc/self/statm's second field, in pages); None without /proc."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def resident_growth(build: Callable[[], Sessions], estimate: int) -> tuple[Sessions, int]:
    """Build a set and what it costs: the growth of resident memory across the build. That, not the
    graph files' size, is what the process holds for it: onnxruntime's copies of the weights
    (pre-packed, relaid out), the patched tensors it keeps reading, minus what fusions dropped.
    Without /proc (not Linux) the graph files' size stands in. Never below 0: pages freed
    meanwhile by another thread would otherwise make a set look free."""
    before = resident_bytes()
    sessions = build()
    after = resident_bytes()
    if before is None or after is None:
        return sessions, estimate
    return sessions, max(after - before, 0)
