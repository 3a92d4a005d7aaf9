"""The Ray Serve deployment that serves one model: one ModelWorker per replica, requests grouped into
batches per batch key with Ray Serve's `@serve.batch`, sampling on a worker thread off the event loop.

`@serve.batch` keeps one queue per decorated object, so each batch key gets a `_KeyBatcher` of its
own: requests that can share a UNet call wait together for up to `batch_wait_s`; different sizes,
step counts or samplers never meet in one batch. `batch_size_fn` counts images, not requests, so
`max_batch_size` bounds the UNet batch. A request with more images than that runs as a batch of its own.

Cancellation reaches a running batch two ways: Ray Serve cancels the request (client gone, or the
ingress cancelled it), which flags the job here; or the JobStore says so in its answer to the step
report. A batch stops between two steps once all its requests are cancelled; a cancelled request's
caller is answered at once either way.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from .jobs import store_actor
from .worker import Cancelled, Job, ModelSpec, ModelWorker

log = logging.getLogger(__name__)
MAX_BATCH_QUEUES = 64  # distinct batch keys with a queue of their own; rarer ones run unbatched


class _KeyBatcher:
    """The batch queue of one batch key."""

    def __init__(self, server: "ModelServer", max_batch_size: int, wait_s: float):
        self.server = server
        self.submit.set_max_batch_size(max_batch_size)
        self.submit.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=lambda jobs: sum(j.request.n_images for j in jobs))
    async def submit(self, jobs: list[Job]) -> list:
        return await self.server.run(jobs)


@serve.deployment(name="model", max_ongoing_requests=16, max_queued_requests=64, health_check_period_s=10,
                  health_check_timeout_s=60, graceful_shutdown_timeout_s=5, ray_actor_options={"num_cpus": 1})
class ModelServer:
    def __init__(self, spec: dict, max_batch_size: int = 8, batch_wait_s: float = 0.05):
        self.worker = ModelWorker(ModelSpec(**spec))
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ldm-sampling")  # one run at a time per replica
        self.batchers: dict[tuple, _KeyBatcher] = {}
        self.jobs: dict[str, Job] = {}
        self.store = store_actor()
        self._pending = None  # the last step report, whose answer lists cancelled jobs
        self._last_step = None

    def info(self) -> dict:
        return self.worker.info()

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        """Ray Serve's health check: a one-step generation (a stuck or broken model fails it)."""
        self.worker.health()

    async def generate(self, job_id: str, request) -> object:
        """Serve one GenerationRequest; returns a GenerationResult or raises (ValueError: bad input)."""
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self.pool, self.worker.prepare, job_id, request)
        self.jobs[job_id] = job
        try:
            solo = job.key[-1] is not None  # an input image or LoRA tags: never shares a batch
            if solo or request.n_images > self.max_batch_size or (
                    job.key not in self.batchers and len(self.batchers) >= MAX_BATCH_QUEUES):
                (result,) = await self.run([job])
            else:
                batcher = self.batchers.get(job.key)
                if batcher is None:
                    batcher = self.batchers[job.key] = _KeyBatcher(self, self.max_batch_size, self.batch_wait_s)
                result = await batcher.submit(job)
        except asyncio.CancelledError:
            job.cancel()  # the sampling thread stops the batch at the next step if nobody else needs it
            self.store.finish.remote(job_id, "cancelled")
            raise
        finally:
            self.jobs.pop(job_id, None)
        if isinstance(result, BaseException):
            raise result
        return result

    async def cancel(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is not None:
            job.cancel()
        return job is not None

    async def run(self, jobs: list[Job]) -> list:
        """Run one batch on the sampling thread; one result or exception per job."""
        jobs = [j for j in jobs if not j.cancelled]
        already = await self.store.start.remote([j.id for j in jobs])
        for job in jobs:
            if job.id in already:
                job.cancel()
        live = [j for j in jobs if not j.cancelled]
        results = {j.id: Cancelled("cancelled before it started") for j in jobs}
        if live:
            loop = asyncio.get_running_loop()
            self._last_step = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.pool, self.worker.run_batch, live, self._on_step)
                results.update(zip([j.id for j in live], out))
            except Cancelled as e:
                results.update({j.id: e for j in live})
            finally:
                self._pending = None
        return [results[j.id] for j in jobs]

    def _on_step(self, jobs: list[Job], done: int, total: int) -> None:
        """Runs on the sampling thread after every step: report it, pick up cancellations (the worker then
        stops the batch once all its jobs are cancelled)."""
        import ray

        now = time.perf_counter()
        seconds, self._last_step = now - self._last_step, now
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                cancelled = set(ray.get(ready[0]))
                for job in jobs:
                    if job.id in cancelled:
                        job.cancel()
        self._pending = self.store.progress.remote([j.id for j in jobs], done, total, seconds)
