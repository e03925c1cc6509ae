"""The HTTP surface: IMGAPI's endpoints and request/response shapes, on Starlette.

Endpoints (docs/api.md has examples):
  GET    /ping
  GET    /images                     ListImages
  POST   /images?action=create-from-vm&vm_uuid=UUID    CreateImageFromVm
  GET    /images/:uuid               GetImage
  DELETE /images/:uuid               DeleteImage
  GET    /images/:uuid/file          GetImageFile
  GET    /images/:uuid/jobs          ListImageJobs
  GET    /jobs/:uuid                 the workflow job (node-workflow's GET /jobs/:uuid)
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from imgprep import __version__, safejson
from imgprep.api.auth import TokenAuth
from imgprep.api.errors import ApiError, from_imgprep, invalid_parameter, missing_parameter
from imgprep.api.service import EXECUTIONS, IMAGE_STATES, MAX_LIMIT, TASKS, UUID_RE, ImageFilter, Service
from imgprep.errors import ImgprepError

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024  # a manifest is a few KiB


def _service(request: Request) -> Service:
    return cast(Service, request.app.state.service)


# --- query and body parsing ----------------------------------------------------------


def _bool_param(query: QueryParams, name: str) -> bool | None:
    """IMGAPI's boolFromString: true/1 and false/0."""
    value = query.get(name)
    if value is None:
        return None
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise invalid_parameter(name, f"invalid value for {name!r}: {value!r} is not a boolean")


def _uuid_param(query: QueryParams, name: str) -> str | None:
    value = query.get(name)
    if value is not None and not UUID_RE.match(value):
        raise invalid_parameter(name, f"invalid {name!r}: not a UUID: {value!r}")
    return value.lower() if value else None


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, "RequestEntityTooLarge", f"request body larger than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "RequestEntityTooLarge", f"request body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return None
    try:
        return safejson.loads(raw, max_bytes=MAX_BODY)
    except safejson.BadJSON as exc:
        raise ApiError(400, "InvalidContent", f"invalid JSON in the request body: {exc}") from None


async def _call(fn: Any, *args: Any) -> Any:
    """Run a blocking service call in a worker thread, mapping library errors to IMGAPI's."""
    try:
        return await run_in_threadpool(fn, *args)
    except ImgprepError as exc:
        raise from_imgprep(exc) from None


# --- endpoints -------------------------------------------------------------------------


async def ping(request: Request) -> Response:
    return JSONResponse({"ping": "pong", "pid": os.getpid(), "version": __version__, "imgapi": True})


async def create_image(request: Request) -> Response:
    query = request.query_params
    action = query.get("action")
    if action != "create-from-vm":
        what = "CreateImage (POST /images without an action)" if action is None else f"action {action!r}"
        raise invalid_parameter("action", f"{what} is not supported by imgprep; use action=create-from-vm")
    vm_uuid = query.get("vm_uuid")
    if vm_uuid is None:
        raise missing_parameter("vm_uuid", "missing 'vm_uuid' parameter")
    if not UUID_RE.match(vm_uuid):
        raise invalid_parameter("vm_uuid", f"invalid 'vm_uuid': not a UUID: {vm_uuid!r}")
    if _bool_param(query, "incremental"):
        raise invalid_parameter(
            "incremental", "incremental images are not supported: imgprep exports full, flattened images"
        )
    depth = query.get("max_origin_depth")
    if depth is not None:
        try:
            number = float(depth)
        except ValueError:
            raise invalid_parameter("max_origin_depth", f"max_origin_depth {depth!r} is not a number") from None
        if number < 2:
            raise invalid_parameter("max_origin_depth", f"max_origin_depth {depth} must be greater than 1")
        # meaningful only for incremental images, which are refused above: accepted and ignored, as IMGAPI does
    if query.get("channel"):
        raise invalid_parameter("channel", "this server does not use image channels")
    account = _uuid_param(query, "account")
    body = await _json_body(request)
    if body is None:
        raise missing_parameter("body", "missing request body (image manifest)")
    if not isinstance(body, dict):
        raise ApiError(
            422,
            "ValidationFailed",
            "the request body must be a JSON object (the image manifest)",
            errors=[{"field": "body", "code": "Invalid", "message": "not a JSON object"}],
        )
    manifest = dict(body)
    manifest.pop("channels", None)  # IMGAPI drops it too
    if account is not None:
        owner = manifest.setdefault("owner", account)
        if owner != account:
            raise invalid_parameter("owner", f"invalid owner: given owner {owner!r} does not match account {account!r}")
    host = query.get("host")  # imgprep's own: one of the configured compute nodes (smartos)
    record = await _call(_service(request).create_from_vm, vm_uuid.lower(), manifest, host)
    workflow_api = str(request.base_url).rstrip("/")
    return JSONResponse(
        {"image_uuid": record["params"]["image_uuid"], "job_uuid": record["uuid"]},
        headers={"workflow-api": workflow_api},
    )


async def list_images(request: Request) -> Response:
    query = request.query_params
    state = query.get("state", "active")
    if state not in IMAGE_STATES:
        raise invalid_parameter("state", f"invalid state {state!r} (one of {', '.join(IMAGE_STATES)})")
    limit_text = query.get("limit")
    limit = MAX_LIMIT
    if limit_text is not None:
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            raise invalid_parameter("limit", f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit_text!r}")
        limit = int(limit_text)
    selection = ImageFilter(
        state=state,
        name=query.get("name"),
        version=query.get("version"),
        owner=_uuid_param(query, "owner"),
        os=query.get("os"),
        type=query.get("type"),
        public=_bool_param(query, "public"),
        account=_uuid_param(query, "account"),
        limit=limit,
        marker=_uuid_param(query, "marker"),
    )
    return JSONResponse(await _call(_service(request).list_images, selection))


async def get_image(request: Request) -> Response:
    account = _uuid_param(request.query_params, "account")
    return JSONResponse(await _call(_service(request).get_image, request.path_params["uuid"], account))


async def delete_image(request: Request) -> Response:
    account = _uuid_param(request.query_params, "account")
    await _call(_service(request).delete_image, request.path_params["uuid"], account)
    return Response(status_code=204)


async def get_image_file(request: Request) -> Response:
    service = _service(request)
    account = _uuid_param(request.query_params, "account")
    path, manifest = await _call(service.image_file, request.path_params["uuid"], account)
    content_md5 = await run_in_threadpool(service.md5.get, path)
    headers = {"Content-MD5": content_md5}
    sha1 = manifest["files"][0].get("sha1")
    if sha1:
        headers["ETag"] = sha1
    return FileResponse(path, media_type="application/octet-stream", headers=headers)


async def list_image_jobs(request: Request) -> Response:
    query = request.query_params
    task = query.get("task")
    if task is not None and task not in TASKS:
        raise invalid_parameter("task", f"invalid task {task!r} (one of {', '.join(TASKS)})")
    execution = query.get("execution")
    if execution is not None and execution not in EXECUTIONS:
        raise invalid_parameter("execution", f"invalid execution {execution!r} (one of {', '.join(EXECUTIONS)})")
    account = _uuid_param(query, "account")
    jobs = await _call(_service(request).image_jobs, request.path_params["uuid"], account, task, execution)
    return JSONResponse(jobs)


async def get_job(request: Request) -> Response:
    # open without the token (IMGAPI's client polls the workflow-api URL without
    # credentials): then only the public view
    account = _uuid_param(request.query_params, "account")
    full = bool(request.scope.get("state", {}).get("authenticated"))
    service = _service(request)
    return JSONResponse(await _call(lambda: service.get_job(request.path_params["uuid"], account, full=full)))


# --- errors --------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    return cast(ApiError, exc).response()


async def _http_error(request: Request, exc: Exception) -> Response:
    http = cast(HTTPException, exc)
    if http.status_code == 404:
        error = ApiError(404, "ResourceNotFound", f"{request.url.path} does not exist")
    elif http.status_code == 405:
        error = ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.url.path}")
    else:
        error = ApiError(http.status_code, "BadRequestError", str(http.detail))
    return error.response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s crashed", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "InternalError", "internal error (see the server log)").response()


def build_app(service: Service, token: str | None) -> Starlette:
    routes = [
        Route("/ping", ping, methods=["GET"]),
        Route("/images", list_images, methods=["GET"]),
        Route("/images", create_image, methods=["POST"]),
        Route("/images/{uuid}", get_image, methods=["GET"]),
        Route("/images/{uuid}", delete_image, methods=["DELETE"]),
        Route("/images/{uuid}/file", get_image_file, methods=["GET"]),
        Route("/images/{uuid}/jobs", list_image_jobs, methods=["GET"]),
        Route("/jobs/{uuid}", get_job, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(TokenAuth, token=token)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.service = service
    return app
