"""The HTTP ingress: a FastAPI app deployed on Ray Serve in front of one ModelServer deployment per model.

The routes live in api_a1111 / api_openai / api_jobs and reach the running ingress through
`request.app.state.server` (a `Server`). Everything they share is here: auth, the caller's identity,
request-size guards, the model table, and `generate`, which files a job in the JobStore, calls the
model's deployment and turns every failure into an HTTP status:

    bad input (ValueError, RequestError)      400 (404 for an unknown model)
    queue full (Ray Serve backpressure)       503 + Retry-After (the OpenAI routes answer 429)
    replica died or unavailable               503 (Ray restarts it; the next request is served)
    cancelled (DELETE, interrupt, hang-up)    409
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from .convert import RequestError, ServeLimits
from .jobs import store_actor
from .worker import Cancelled

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5
OPEN_ROUTES = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")


class HTTPError(Exception):
    """An error the routes answer with: status, message, and the parameter it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def error_response(request: Request, e: HTTPError) -> JSONResponse:
    """OpenAI's error object on /v1, A1111's {error, detail} elsewhere."""
    if route_path(request).startswith("/v1/"):
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error"}.get(e.status, "server_error")
        body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    else:
        body = {"error": type(e).__name__ if e.status >= 500 else "HTTPException", "detail": e.message}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def route_path(request: Request) -> str:
    """The path inside the app (without the route prefix Ray Serve mounts it under)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def build_app() -> FastAPI:
    from . import api_a1111, api_jobs, api_openai

    app = FastAPI(title="ldm_engine", description="Latent diffusion serving: AUTOMATIC1111-compatible "
                  "/sdapi/v1, OpenAI-compatible /v1/images, and /v1/jobs.", version=_version())

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return error_response(request, e)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return await _http_error(request, HTTPError(e.status, e.message, e.param, e.code))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        server = getattr(request.app.state, "server", None)
        if server is not None:
            try:
                server.check_request(request)
            except HTTPError as e:
                await server.count(request, e.status)
                return error_response(request, e)
        response = await call_next(request)
        if server is not None:
            await server.count(request, response.status_code)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        text = await request.app.state.server.store.metrics.remote()
        return Response(text, media_type="text/plain; version=0.0.4")

    app.include_router(api_a1111.router)
    app.include_router(api_openai.router)
    app.include_router(api_jobs.router)
    return app


def _version() -> str:
    from .. import __version__

    return __version__


class Server:
    """What every route needs; one per ingress replica."""

    def __init__(self, models: dict, default_model: str, api_key: str | None = None, basic_auth: str | None = None,
                 limits: dict | None = None):
        self.models = models  # served name -> DeploymentHandle of its ModelServer
        self.default_model = default_model
        self.api_key, self.basic_auth = api_key, basic_auth
        self.limits = ServeLimits(**(limits or {}))
        self.store = store_actor()
        self.inflight: dict[str, object] = {}  # job id -> DeploymentResponse (cancellable from this replica)
        self._infos: dict[str, dict] | None = None

    # ---- guards ------------------------------------------------------------------------------------

    def check_request(self, request: Request) -> None:
        if route_path(request) not in OPEN_ROUTES and (self.api_key or self.basic_auth):
            self._authorize(request.headers.get("authorization", ""))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_body_bytes:
            raise HTTPError(413, f"request body of {int(size)} bytes is over the limit of "
                                 f"{self.limits.max_body_bytes} bytes (max_body_bytes)", code="body_too_large")

    def _authorize(self, header: str) -> None:
        scheme, _, value = header.partition(" ")
        ok = False
        if scheme.lower() == "bearer" and self.api_key:
            ok = hmac.compare_digest(value.strip(), self.api_key)
        elif scheme.lower() == "basic" and self.basic_auth:
            try:
                ok = hmac.compare_digest(base64.b64decode(value.strip()).decode(), self.basic_auth)
            except (binascii.Error, UnicodeDecodeError):
                ok = False
        if not ok:
            how = " or ".join(h for h, on in (("'Authorization: Bearer <api key>'", self.api_key),
                                                ("HTTP basic auth", self.basic_auth)) if on)
            raise HTTPError(401, f"missing or wrong credentials: this server needs {how}", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Basic" if self.basic_auth else "Bearer"})

    def owner(self, request: Request) -> str:
        """Who is asking: the credentials' digest when auth is on, else the client's address."""
        header = request.headers.get("authorization")
        if header:
            return hashlib.sha256(header.encode()).hexdigest()[:16]
        return request.client.host if request.client else "unknown"

    async def count(self, request: Request, status: int) -> None:
        route = request.scope.get("route")  # the path template (no job ids), once routing has run
        self.store.count_request.remote(getattr(route, "path", None) or "unrouted", status)

    # ---- models ------------------------------------------------------------------------------------

    async def infos(self) -> dict[str, dict]:
        if self._infos is None:
            self._infos = {name: await handle.info.remote() for name, handle in self.models.items()}
        return self._infos

    async def model_name(self, name: str | None, param: str = "model") -> str:
        """A served model's name from what the client sent (its name, or A1111's 'name [hash]' title)."""
        if not name:
            options = await self.store.get_options.remote()
            return options.get("sd_model_checkpoint") or self.default_model
        infos = await self.infos()
        for served, info in infos.items():
            if name in (served, f"{served} [{info['hash']}]", info["hash"]):
                return served
        raise HTTPError(404, f"model {name!r} is not served here; served: {', '.join(infos)}", param, "model_not_found")

    # ---- generation --------------------------------------------------------------------------------

    async def generate(self, request: Request, req, source: str, job_id: str | None = None):
        """Run one GenerationRequest on its model's deployment; returns the GenerationResult."""
        req.model = await self.model_name(req.model)
        if job_id is None:
            job_id = await self.store.create.remote(self.owner(request), req.model, req.steps, req.n_images, source)
        response = self.models[req.model].generate.remote(job_id, req)
        self.inflight[job_id] = response
        try:
            result = await response
        except asyncio.CancelledError:  # the client hung up: stop the job too
            response.cancel()
            self.store.finish.remote(job_id, "cancelled")
            raise
        except BaseException as e:
            error = self._http_error(e, source)
            self.store.finish.remote(job_id, "cancelled" if error.status == 409 else "failed", error=error.message)
            raise error from None
        finally:
            self.inflight.pop(job_id, None)
        return job_id, result

    def cancel(self, job_id: str) -> None:
        if (response := self.inflight.get(job_id)) is not None:
            response.cancel()

    @staticmethod
    def _http_error(e: BaseException, source: str) -> HTTPError:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors

        cause = e.cause if isinstance(e, ray_errors.RayTaskError) and e.cause is not None else e
        if isinstance(cause, (RequestError, HTTPError)):
            return cause if isinstance(cause, HTTPError) else HTTPError(cause.status, cause.message, cause.param,
                                                                        cause.code)
        if isinstance(cause, ValueError):
            return HTTPError(400, str(cause), code="invalid_value")
        if isinstance(cause, (Cancelled, serve_errors.RequestCancelledError, ray_errors.TaskCancelledError,
                              asyncio.CancelledError)):
            return HTTPError(409, "the request was cancelled (DELETE /v1/jobs/{id}, interrupt, or the client left)",
                             code="cancelled")
        if isinstance(cause, serve_errors.BackPressureError):
            status = 429 if source == "openai" else 503
            return HTTPError(status, "the model's queue is full; retry after a few seconds", code="queue_full",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(cause, (ray_errors.RayActorError, ray_errors.ActorUnavailableError,
                              serve_errors.DeploymentUnavailableError)):
            return HTTPError(503, "the model replica serving this request stopped; it is being restarted, "
                                  "retry the request", code="replica_unavailable",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
        log.exception("generation failed", exc_info=cause)
        return HTTPError(500, f"generation failed: {cause}", code="internal_error")


@serve.deployment(name="ingress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The ingress deployment: its app is built in the replica, after the constructor, around its Server."""

    def __init__(self, models: dict, default_model: str, api_key: str | None = None, basic_auth: str | None = None,
                 limits: dict | None = None):
        self.server = Server(models, default_model, api_key, basic_auth, limits)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = build_app()
        app.state.server = self.server
        return app
