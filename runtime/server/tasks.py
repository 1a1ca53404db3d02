"""Task ids and progress, as A1111 keeps them: one record per txt2img task, readable by id.

A1111 gives every generation a task id (`force_task_id` in the request, or `task(txt2img-XXXXXXX)`)
and answers `POST /internal/progress {"id_task"}` for that task: queued (with its place), active
(with progress, ETA and a live preview) or completed (the last 16). `GET /sdapi/v1/progress` has no
id: it reports the current job. Both fronts (one box, or a cluster with many jobs running at once)
keep their tasks on a `TaskBoard` in the process that answers HTTP; the global progress answer is
the running job that started first, whose textinfo also counts the others.
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from .images import preview_base64

FINISHED_KEPT = 16  # A1111 remembers the last 16 finished task ids
COUNTS = ("completed", "interrupted", "rejected", "dropped", "failed")


def new_task_id(kind: str = "txt2img") -> str:
    """A1111's create_task_id: `task(txt2img-XXXXXXX)` (random, not secret)."""
    return f"task({kind}-{''.join(random.choices(string.ascii_uppercase + string.digits, k=7))})"


def idle_progress() -> dict[str, Any]:
    state = {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
        "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
    }  # fmt: skip
    return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}


@dataclass
class ProgressUpdate:
    """What a running job reports (from the worker thread, or from a cluster replica's stream)."""

    job_no: int
    sampling_step: int
    sampling_steps: int
    latents: np.ndarray | None = None  # the first image's sampler state, for the live preview


class JobProgress:
    """One job's progress; written by whoever runs the job, read by the HTTP event loop."""

    def __init__(self, job_count: int) -> None:
        self._lock = threading.Lock()
        self.job_count = job_count
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self._started = time.monotonic()
        self._update = ProgressUpdate(0, 0, 0)
        self.interrupted = False

    def update(self, update: ProgressUpdate) -> None:
        with self._lock:
            if update.latents is None:
                update.latents = self._update.latents if update.job_no == self._update.job_no else None
            self._update = update

    def mark_interrupted(self) -> None:
        with self._lock:
            self.interrupted = True

    def snapshot(self, with_preview: bool, others: str = "") -> dict[str, Any]:
        """A1111's GET /sdapi/v1/progress answer for this job: progress over all batches, and the ETA
        extrapolated from the time spent so far."""
        with self._lock:
            update, elapsed = self._update, time.monotonic() - self._started
        done = min((update.job_no + update.sampling_step / (update.sampling_steps or 1)) / self.job_count, 1.0)
        eta = elapsed * (1 - done) / done if done > 0 else 0.0
        state = idle_progress()["state"] | {
            "job": "txt2img", "job_count": self.job_count, "job_no": update.job_no, "interrupted": self.interrupted,
            "sampling_step": update.sampling_step, "sampling_steps": update.sampling_steps,
            "job_timestamp": self.job_timestamp,
        }  # fmt: skip
        text = f"batch {update.job_no + 1}/{self.job_count}, step {update.sampling_step}/{update.sampling_steps}"
        preview = preview_base64(update.latents) if with_preview and update.latents is not None else None
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": preview,
                "textinfo": text + others}  # fmt: skip


class TaskBoard:
    """Every task the front knows of: waiting (in order), running, and the last finished ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, int] = OrderedDict()  # id -> job count
        self._running: dict[str, JobProgress] = {}
        self._finished: deque[str] = deque(maxlen=FINISHED_KEPT)
        self.counts = dict.fromkeys(COUNTS, 0)

    def queued(self, task_id: str, job_count: int) -> None:
        with self._lock:
            self._waiting[task_id] = job_count

    def start(self, task_id: str) -> JobProgress:
        with self._lock:
            progress = JobProgress(self._waiting.pop(task_id, 1))
            self._running[task_id] = progress
            return progress

    def finish(self, task_id: str, outcome: str | None) -> None:
        """The task ended (`outcome` one of COUNTS, or None when it was not counted elsewhere)."""
        with self._lock:
            self._waiting.pop(task_id, None)
            self._running.pop(task_id, None)
            self._finished.append(task_id)
            if outcome is not None:
                self.counts[outcome] += 1

    def reject(self, task_id: str | None = None) -> None:
        """A job refused for a full queue (429): counted, and never listed as waiting or finished."""
        with self._lock:
            if task_id is not None:
                self._waiting.pop(task_id, None)
            self.counts["rejected"] += 1

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def progress_of(self, task_id: str) -> JobProgress | None:
        with self._lock:
            return self._running.get(task_id)

    def sizes(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return len(self._running), len(self._waiting)

    def job_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def global_progress(self, with_preview: bool) -> dict[str, Any]:
        """GET /sdapi/v1/progress without an id: the running job that started first (the one that
        will finish soonest), its textinfo followed by how many others run and wait."""
        with self._lock:
            first = next(iter(self._running.values()), None)
            running, waiting = len(self._running), len(self._waiting)
        if first is None:
            return idle_progress() | ({"textinfo": f"{waiting} waiting"} if waiting else {})
        others = f"; {running} running, {waiting} waiting" if running > 1 or waiting else ""
        return first.snapshot(with_preview, others)

    def task_progress(self, task_id: str | None, with_preview: bool, id_live_preview: int) -> dict[str, Any]:
        """POST /internal/progress: A1111's ProgressResponse for one task."""
        with self._lock:
            task = self._running.get(task_id) if task_id else None
            waiting = list(self._waiting)
            completed = task_id in self._finished
        queued = task_id in waiting
        answer: dict[str, Any] = {"active": task is not None, "queued": queued, "completed": completed,
                                  "progress": None, "eta": None, "live_preview": None, "id_live_preview": -1,
                                  "textinfo": "Waiting..."}  # fmt: skip
        if queued:
            answer["textinfo"] = f"In queue: {waiting.index(task_id) + 1}/{len(waiting)}"
        if task is None:
            return answer
        snapshot = task.snapshot(with_preview)
        state, preview = snapshot["state"], snapshot["current_image"]
        answer.update(progress=snapshot["progress"], eta=snapshot["eta_relative"], textinfo=snapshot["textinfo"],
                      id_live_preview=id_live_preview)  # fmt: skip
        # A1111 numbers previews so that a client can skip one it already has; the step does that here.
        step_id = state["job_no"] * (state["sampling_steps"] + 1) + state["sampling_step"]
        if preview is not None and step_id != id_live_preview:
            answer.update(live_preview=f"data:image/png;base64,{preview}", id_live_preview=step_id)
        return answer
