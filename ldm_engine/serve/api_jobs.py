"""Jobs: submit now, poll, collect or cancel later.

    POST   /v1/jobs        an A1111 txt2img / img2img body (+ "kind": "txt2img" | "img2img"); answers
                           {"id", "state": "queued"} at once (202)
    GET    /v1/jobs/{id}   state (queued, running, done, failed, cancelled), step / steps, progress, ETA
                           and, once done, "result": the A1111 response (images, parameters, info)
    DELETE /v1/jobs/{id}   cancel: a queued job never starts, a running one stops after its current step
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from . import convert, schemas
from .api_a1111 import body_of, server_of
from .server import HTTPError

router = APIRouter(prefix="/v1/jobs", tags=["Jobs"])
log = logging.getLogger(__name__)
_tasks: set[asyncio.Task] = set()  # keeps the running jobs' tasks referenced until they finish


@router.post("", status_code=202)
async def submit(request: Request):
    server = server_of(request)
    data, body = await body_of(request, schemas.JobRequest)
    names = list(await server.infos())
    req = convert.job_request(body, server.limits, names)
    req.model = await server.model_name(req.model)
    job_id = await server.store.create.remote(server.owner(request), req.model, req.steps, req.n_images, "jobs")

    async def run():
        try:
            _, result = await server.generate(request, req, "jobs", job_id=job_id)
        except HTTPError:
            return  # generate() recorded the failure or cancellation in the store
        except Exception as e:  # noqa: BLE001 - a job's failure belongs in its record, not in the log only
            log.exception("job %s failed", job_id)
            await server.store.finish.remote(job_id, "failed", error=str(e))
            return
        await server.store.finish.remote(job_id, "done", result=convert.a1111_response(data, result, req))

    task = asyncio.get_running_loop().create_task(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return JSONResponse({"id": job_id, "state": "queued"}, status_code=202)


@router.get("/{job_id}")
async def status(request: Request, job_id: str):
    job = await server_of(request).store.view.remote(job_id)
    if job is None:
        raise HTTPError(404, f"no job {job_id!r} (finished jobs are kept for an hour)", code="not_found")
    return job


@router.delete("/{job_id}")
async def cancel(request: Request, job_id: str):
    server = server_of(request)
    job = await server.store.cancel.remote(job_id)
    if job is None:
        raise HTTPError(404, f"no job {job_id!r}", code="not_found")
    server.cancel(job_id)
    return job
