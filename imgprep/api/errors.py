"""IMGAPI-shaped errors: ``{"code", "message"[, "errors"]}`` with IMGAPI's HTTP statuses.

Codes and statuses follow IMGAPI's error table (ValidationFailed and InvalidParameter
422, ResourceNotFound 404, ImageUuidAlreadyExists 409, UnauthorizedError 401,
ServiceUnavailableError 503, InternalError 500) and restify's ``InvalidContent`` (400)
for a body that is not JSON. Where IMGAPI has no equivalent, imgprep's own code is
kept with the closest status (``VmBusy`` 409).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse

from imgprep.errors import ImgprepError, InvalidInput, VmBusy

_MANIFEST_FIELD = re.compile(r"^manifest \.([A-Za-z0-9_]+)")


class ApiError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        errors: Sequence[Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.errors is not None:
            body["errors"] = self.errors
        return body

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(message: str) -> ApiError:
    return ApiError(404, "ResourceNotFound", message)


def invalid_parameter(field: str, message: str) -> ApiError:
    return ApiError(422, "InvalidParameter", message, errors=[{"field": field, "code": "Invalid", "message": message}])


def missing_parameter(field: str, message: str) -> ApiError:
    return ApiError(
        422, "ValidationFailed", message, errors=[{"field": field, "code": "MissingParameter", "message": message}]
    )


def from_imgprep(exc: ImgprepError) -> ApiError:
    """Map a library error raised while accepting a request (nothing touched yet)."""
    if isinstance(exc, VmBusy):
        return ApiError(409, "VmBusy", exc.message)
    if isinstance(exc, InvalidInput):
        if exc.code == "VmNotFound":
            # IMGAPI answers an unknown vm_uuid with InvalidParameter on that field
            return invalid_parameter("vm_uuid", exc.message)
        if exc.code in ("LibvirtUnreachable", "NodesUnreachable"):
            return ApiError(503, "ServiceUnavailableError", exc.message)
        if exc.code == "ResourceNotFound":
            return not_found(exc.message)
        errors = []
        for problem in exc.problems:
            match = _MANIFEST_FIELD.match(problem)
            field = match.group(1) if match else ("body" if problem.startswith("manifest") else "vm_uuid")
            errors.append({"field": field, "code": "Invalid", "message": problem})
        return ApiError(422, "ValidationFailed", exc.message, errors=errors)
    return ApiError(500, "InternalError", f"{exc.code}: {exc.message}")
