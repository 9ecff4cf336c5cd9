"""OpenAI-style API errors: an exception carrying the HTTP status, the JSON body clients expect, and the mapping
of the engine's refusals and error outputs onto them."""

from __future__ import annotations

from typing import Any

from baleen.actors.admission import AdmissionError
from baleen.messages import RequestOutput

# The `type` OpenAI uses for each status; ApiError picks it when the caller names none.
_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """A request failed in a way the client should be told about: status, message, and the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type if type is not None else _TYPE_FOR_STATUS.get(status, "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error body for this error."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, type={self.type!r}, param={self.param!r})"


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, the shape the openai client parses."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def admission_error(e: AdmissionError) -> ApiError:
    """The HTTP error for a request the admission check refused (400, or 503 when the engine is overloaded)."""
    if e.kind == "overloaded":
        return ApiError(503, str(e), code="overloaded")
    return ApiError(400, str(e), param=e.param, code=e.code)


def engine_error(out: RequestOutput) -> ApiError:
    """The HTTP error for an engine output with finish_reason "error" (503s get a Retry-After header)."""
    message = out.error or "the engine failed the request"
    if out.error_kind == "invalid":
        return ApiError(400, message)
    if out.error_kind == "overloaded":
        return ApiError(503, message, code="overloaded")
    return ApiError(500, message)
