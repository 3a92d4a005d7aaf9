"""AUTOMATIC1111-compatible routes under /sdapi/v1: what Open WebUI, Krita plugins, bots and the
`webuiapi` client call. Field names, defaults and the response shape are A1111's (see schemas/convert);
`progress` and `interrupt` act on the caller's latest request."""
from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from pydantic import ValidationError

from . import convert, schemas
from .server import HTTPError

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])


async def body_of(request: Request, model):
    """The JSON body validated against `model`: malformed JSON or wrong types -> 400 naming the field."""
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return data, model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise HTTPError(400, f"{where}: {first['msg']}", param=where, code="invalid_value") from None


def server_of(request: Request):
    return request.app.state.server


async def _generate(request: Request, schema, to_request) -> dict:
    server = server_of(request)
    data, body = await body_of(request, schema)
    req = to_request(body, server.limits, list(await server.infos()))
    _, result = await server.generate(request, req, "a1111")
    return convert.a1111_response(data, result, req)  # without the input images, as A1111 answers


@router.post("/txt2img")
async def txt2img(request: Request):
    return await _generate(request, schemas.Txt2ImgRequest, convert.txt2img_request)


@router.post("/img2img")
async def img2img(request: Request):
    return await _generate(request, schemas.Img2ImgRequest, convert.img2img_request)


@router.get("/samplers")
async def samplers():
    return convert.a1111_samplers()


@router.get("/schedulers")
async def schedulers():
    return convert.a1111_schedulers()


@router.get("/sd-models")
async def sd_models(request: Request):
    infos = await server_of(request).infos()
    return [{"title": f"{name} [{info['hash']}]", "model_name": name, "hash": info["hash"], "sha256": None,
             "filename": info["path"], "config": None} for name, info in infos.items()]


@router.get("/options")
async def get_options(request: Request):
    server = server_of(request)
    name = await server.model_name(None)
    info = (await server.infos())[name]
    options = await server.store.get_options.remote()
    return {**options, "sd_model_checkpoint": f"{name} [{info['hash']}]", "sd_checkpoint_hash": info["hash"]}


@router.post("/options")
async def set_options(request: Request):
    """Accepts A1111's options; `sd_model_checkpoint` switches the default model (for every caller)."""
    server = server_of(request)
    data, _ = await body_of(request, schemas.OptionsRequest)
    values = {}
    if data.get("sd_model_checkpoint"):
        values["sd_model_checkpoint"] = await server.model_name(data["sd_model_checkpoint"], "sd_model_checkpoint")
    await server.store.set_options.remote(values)
    return None


@router.get("/progress")
async def progress(request: Request):
    server = server_of(request)
    job = await server.store.latest_view.remote(server.owner(request))
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": _state(None), "current_image": None, "textinfo": None}
    eta = job["eta_s"] or 0.0
    if job["state"] == "running" and job["started"] and not job["step"]:  # started, no step yet: A1111 guesses too
        eta = 0.0
    return {"progress": job["progress"] if job["state"] in ("running", "queued") else 0.0,
            "eta_relative": eta, "state": _state(job), "current_image": None,
            "textinfo": f"{job['state']}: step {job['step']} of {job['steps']}"}


def _state(job: dict | None) -> dict:
    """A1111's `state` object for the caller's latest job."""
    active = job is not None and job["state"] in ("queued", "running")
    return {"skipped": False, "interrupted": bool(job and job["state"] == "cancelled"),
            "stopping_generation": False, "job": f"task({job['id']})" if active else "",
            "job_count": 1 if active else 0, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "job_no": 0, "sampling_step": job["step"] if job else 0, "sampling_steps": job["steps"] if job else 0}


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop the caller's latest request after its current step."""
    server = server_of(request)
    job = await server.store.cancel_latest.remote(server.owner(request))
    if job is not None:
        server.cancel(job["id"])
    return None


@router.post("/skip")
async def skip(request: Request):
    return await interrupt(request)


@router.get("/embeddings")
async def embeddings(request: Request):
    server = server_of(request)
    name = await server.model_name(None)
    info = (await server.infos())[name]
    loaded = {trigger: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": e["shape"],
                        "vectors": e["vectors"]} for trigger, e in info["embeddings"].items()}
    return {"loaded": loaded, "skipped": {}}


@router.get("/loras")
async def loras(request: Request):
    from ..adapters.tags import available_loras

    server = server_of(request)
    info = (await server.infos())[await server.model_name(None)]
    found = available_loras(info["loras"]) if info["loras"] else {}
    return [{"name": name, "alias": name, "path": str(paths[0]), "metadata": {}} for name, paths in found.items()]


@router.get("/cmd-flags")
async def cmd_flags(request: Request):
    server = server_of(request)
    return {"api": True, "api_auth": bool(server.basic_auth), "nowebui": True}
