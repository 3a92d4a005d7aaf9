"""OpenAI-compatible image routes under /v1: `images/generations`, `images/edits` (multipart; the mask's
transparent pixels mark the area to repaint), `models`, and the short-lived files behind `url` answers.
Errors come in OpenAI's {"error": {message, type, param, code}} form (server.error_response)."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from . import convert, schemas
from .api_a1111 import body_of, server_of
from .server import HTTPError

router = APIRouter(prefix="/v1", tags=["OpenAI"])
URL_TTL_S = 3600  # how long an image answered by URL stays downloadable


async def _answer(request: Request, req, response_format: str) -> dict:
    server = server_of(request)
    _, result = await server.generate(request, req, "openai")
    if response_format != "url":
        return convert.openai_response(result, "b64_json", None, revised_prompt=req.prompt)
    base, files = str(request.base_url).rstrip("/"), {}

    def url_for(png: bytes) -> str:  # each PNG is encoded once; it is stored under this id just below
        file_id = uuid.uuid4().hex
        files[file_id] = png
        return f"{base}/v1/files/{file_id}.png"

    answer = convert.openai_response(result, "url", url_for, revised_prompt=req.prompt)
    for file_id, png in files.items():
        await server.store.put_file.remote(png, URL_TTL_S, file_id)
    return answer


@router.post("/images/generations")
async def generations(request: Request):
    server = server_of(request)
    _, body = await body_of(request, schemas.ImageGenerationRequest)
    name = await server.model_name(body.model)
    size = (await server.infos())[name]["size"]
    req = convert.openai_generation_request(body, server.limits, list(await server.infos()), (size, size))
    req.model = name
    return await _answer(request, req, body.response_format or "b64_json")


@router.post("/images/edits")
async def edits(request: Request):
    server = server_of(request)
    try:
        form = await request.form(max_files=4, max_fields=32, max_part_size=server.limits.max_input_bytes)
    except Exception as e:  # not multipart, or a part over the size limit
        raise HTTPError(400, f"images/edits takes multipart/form-data with image, mask and prompt: {e}",
                        code="invalid_form") from None

    async def file_bytes(field: str) -> bytes | None:
        value = form.getlist(field) or form.getlist(f"{field}[]")
        if not value:
            return None
        if not isinstance(value[0], UploadFile):
            raise HTTPError(400, f"{field} must be an uploaded file", param=field, code="invalid_value")
        return await value[0].read()

    image, mask = await file_bytes("image"), await file_bytes("mask")
    if image is None:
        raise HTTPError(400, "images/edits needs an image file", param="image", code="missing_required_parameter")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    name = await server.model_name(fields.get("model"))
    size = (await server.infos())[name]["size"]
    req = convert.openai_edit_request(image, mask, fields, server.limits, list(await server.infos()), (size, size))
    req.model = name
    return await _answer(request, req, fields.get("response_format") or "b64_json")


@router.get("/models")
async def models(request: Request):
    infos = await server_of(request).infos()
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ldm_engine"}
                                       for name in infos]}


@router.get("/models/{name}")
async def model(request: Request, name: str):
    infos = await server_of(request).infos()
    if name not in infos:
        raise HTTPError(404, f"model {name!r} is not served here; served: {', '.join(infos)}", "model",
                        "model_not_found")
    return {"id": name, "object": "model", "created": 0, "owned_by": "ldm_engine"}


@router.get("/files/{file_id}.png")
async def file(request: Request, file_id: str):
    data = await server_of(request).store.get_file.remote(file_id)
    if data is None:
        raise HTTPError(404, "no such image, or its URL expired; ask for response_format=b64_json to keep images",
                        code="not_found")
    return Response(data, media_type="image/png")
