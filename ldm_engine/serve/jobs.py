"""Server-wide state shared by every ingress and model replica: jobs (state, step, ETA, results, the
cancel flag), each caller's latest job (A1111's global `progress` / `interrupt`), the options A1111
clients set (`sd_model_checkpoint`), short-lived image files for OpenAI's `url` responses, and the
Prometheus metrics.

`JobStore` is a plain class (tested as one); `ldm-serve` runs it as one named Ray actor so that any
replica, on any node, reads and writes the same jobs. Replicas report a step with one call that also
returns which of their jobs were cancelled in the meantime.
"""
from __future__ import annotations

import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STORE_NAME = "ldm_engine_jobs"
NAMESPACE = "ldm_engine"
FINISHED = ("done", "failed", "cancelled")


class JobStore:
    def __init__(self, ttl_s: float = 3600.0, max_jobs: int = 10000):
        self.ttl_s, self.max_jobs = ttl_s, max_jobs
        self.jobs: dict[str, dict] = {}
        self.latest: dict[str, str] = {}  # caller -> their latest job id
        self.options: dict = {}
        self.files: dict[str, tuple[bytes, float]] = {}  # file id -> (PNG, expiry time)
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ldm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("ldm_errors", "requests that ended in an error, by kind", ["kind"], registry=r)
        self.queue = Gauge("ldm_queue_depth", "requests accepted but not yet sampling", registry=r)
        self.running = Gauge("ldm_running", "requests sampling now", registry=r)
        self.batch = Histogram("ldm_batch_images", "images per batched UNet run", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.step = Histogram("ldm_step_seconds", "seconds per denoising step of a batch",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.images = Counter("ldm_images", "images generated", ["model"], registry=r)

    # ---- jobs --------------------------------------------------------------------------------------

    def create(self, owner: str, model: str, steps: int, n_images: int, source: str, job_id: str | None = None) -> str:
        self._expire()
        job_id = job_id or uuid.uuid4().hex
        self.jobs[job_id] = {"id": job_id, "owner": owner, "model": model, "source": source, "state": "queued",
                             "step": 0, "steps": steps, "n_images": n_images, "created": time.time(),
                             "started": None, "finished": None, "cancel": False, "result": None, "error": None}
        self.latest[owner] = job_id
        self._gauges()
        return job_id

    def start(self, ids: list[str]) -> list[str]:
        """Mark jobs as sampling; returns those already cancelled."""
        now = time.time()
        for i in ids:
            if (job := self.jobs.get(i)) is not None and job["state"] == "queued":
                job.update(state="running", started=now)
        if ids:
            self.batch.observe(sum(self.jobs[i]["n_images"] for i in ids if i in self.jobs))
        self._gauges()
        return [i for i in ids if self.jobs.get(i, {}).get("cancel")]

    def progress(self, ids: list[str], step: int, steps: int, step_seconds: float | None = None) -> list[str]:
        """A batch finished `step` of `steps`; returns the ids among `ids` that were cancelled."""
        for i in ids:
            if (job := self.jobs.get(i)) is not None and job["state"] == "running":
                job.update(step=step, steps=steps)
        if step_seconds is not None:
            self.step.observe(step_seconds)
        return [i for i in ids if self.jobs.get(i, {}).get("cancel")]

    def finish(self, job_id: str, state: str, result: dict | None = None, error: str | None = None) -> None:
        job = self.jobs.get(job_id)
        if job is None or job["state"] in FINISHED:
            return
        job.update(state=state, finished=time.time(), result=result, error=error)
        if state == "done":
            job["step"] = job["steps"]
            self.images.labels(job["model"]).inc(job["n_images"])
        elif state == "failed":
            self.errors.labels("generation").inc()
        self._gauges()

    def cancel(self, job_id: str) -> dict | None:
        """Ask a job to stop; a queued one stops before it starts, a running one after its current step."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job["state"] not in FINISHED:
            job["cancel"] = True
            if job["state"] == "queued":
                self.finish(job_id, "cancelled")
        return self.view(job_id)

    def cancel_latest(self, owner: str) -> dict | None:
        job_id = self.latest.get(owner)
        return self.cancel(job_id) if job_id else None

    def view(self, job_id: str, with_result: bool = True) -> dict | None:
        """What GET /v1/jobs/{id} shows: state, step/steps, progress, ETA (seconds) and, when done, the result."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        out = {k: job[k] for k in ("id", "state", "step", "steps", "model", "created", "started", "finished", "error")}
        out["progress"] = 1.0 if job["state"] == "done" else (job["step"] / job["steps"] if job["steps"] else 0.0)
        out["eta_s"] = None
        if job["state"] == "running" and job["step"] > 0 and job["started"]:
            elapsed = time.time() - job["started"]
            out["eta_s"] = elapsed / job["step"] * (job["steps"] - job["step"])
        if with_result and job["result"] is not None:
            out["result"] = job["result"]
        return out

    def latest_view(self, owner: str) -> dict | None:
        job_id = self.latest.get(owner)
        return self.view(job_id, with_result=False) if job_id else None

    def counts(self) -> dict:
        states = [j["state"] for j in self.jobs.values()]
        return {s: states.count(s) for s in ("queued", "running", "done", "failed", "cancelled")}

    # ---- options, files, metrics -------------------------------------------------------------------

    def get_options(self) -> dict:
        return dict(self.options)

    def set_options(self, values: dict) -> dict:
        self.options.update(values)
        return dict(self.options)

    def put_file(self, data: bytes, ttl_s: float | None = None, file_id: str | None = None) -> str:
        self._expire()
        file_id = file_id or uuid.uuid4().hex
        self.files[file_id] = (data, time.time() + (ttl_s or self.ttl_s))
        return file_id

    def get_file(self, file_id: str) -> bytes | None:
        item = self.files.get(file_id)
        return item[0] if item and item[1] > time.time() else None

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(f"http_{status}").inc()

    def metrics(self) -> bytes:
        """Prometheus text exposition of every metric above."""
        return generate_latest(self.registry)

    def _gauges(self) -> None:
        c = self.counts()
        self.queue.set(c["queued"])
        self.running.set(c["running"])

    def _expire(self) -> None:
        now = time.time()
        for file_id in [f for f, (_, exp) in self.files.items() if exp <= now]:
            del self.files[file_id]
        old = [i for i, j in self.jobs.items() if j["finished"] and now - j["finished"] > self.ttl_s]
        if len(self.jobs) - len(old) > self.max_jobs:  # keep memory bounded: drop the oldest finished first
            done = sorted((j["finished"], i) for i, j in self.jobs.items() if j["finished"])
            old += [i for _, i in done[: len(self.jobs) - self.max_jobs]]
        for job_id in set(old):
            job = self.jobs.pop(job_id, None)
            if job and self.latest.get(job["owner"]) == job_id:
                del self.latest[job["owner"]]


def store_actor(name: str | None = None):
    """The JobStore actor of this Serve application (one per app: apps keep their jobs and options apart),
    created on first use and found by name afterwards, from any replica on any node."""
    import ray

    if name is None:
        from ray import serve

        try:
            name = f"{STORE_NAME}:{serve.get_replica_context().app_name}"
        except Exception:  # outside a replica
            name = STORE_NAME
    actor = ray.remote(num_cpus=0, max_restarts=-1)(JobStore)
    return actor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
