"""Every error leaves the server in OpenAI's shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.errors import (
    InsufficientStorageError,
    InvalidRequestError,
    LLMOSError,
    RateLimitError,
    ServiceUnavailableError,
)

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: LLMOSError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimitError | ServiceUnavailableError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Pydantic appends the union member or literal it tried; keep the field path only.
    clean: list[str] = []
    for p in parts:
        if p.isdigit() and clean:
            clean[-1] += f"[{p}]"
        elif p[:1].isalpha() and not any(ch in p for ch in "[]()'\","):
            clean.append(p)
    return ".".join(clean) or None


def invalid_body(errors: Sequence[Any]) -> InvalidRequestError:
    """The 400 for a body its schema refused (pydantic's ``errors()``), naming the first bad field:
    for a request's body, and for a batch's line, which is checked by the same schemas."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        message, param = "We could not parse the JSON body of your request.", None
    elif first.get("type") == "extra_forbidden":
        message = f"'{param}' is not supported by this server (docs/api.md, Request fields)"
    else:
        message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
    return InvalidRequestError(message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LLMOSError)
    async def _platform_error(_: Request, exc: LLMOSError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_body(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), type_, None, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body(
                "The server had an error while processing your request.", "server_error", None, "internal_error"
            ),
            status_code=500,
        )

    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno == errno.ENOSPC:  # a full disk anywhere (e.g. spooling a multipart upload)
            log.error("disk full: %s", exc)
            return error_response(InsufficientStorageError("no space left on device; free disk space and retry"))
        return await _unexpected(request, exc)

    app.add_exception_handler(OSError, _os_error)  # type: ignore[arg-type]
