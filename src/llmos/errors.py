"""The exception tree of LLM OS, drawn in one place.

Every layer raises these; the API edge maps each to the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` with the class's HTTP status.
"""

from __future__ import annotations


class LLMOSError(Exception):
    """Base of every error the platform raises on purpose."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequestError(LLMOSError):
    """The request is malformed or asks for something impossible (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(LLMOSError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(LLMOSError):
    status_code = 403
    error_type = "permission_error"
    default_code = "insufficient_permissions"


class NotFoundError(LLMOSError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class ConflictError(LLMOSError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLargeError(LLMOSError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitError(LLMOSError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailableError(LLMOSError):
    status_code = 503
    error_type = "server_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ReplicaStopping(ServiceUnavailableError):
    """A request reached an engine replica a server is scaling down or retiring (ADR 0038): the
    server routes it again; when its retries run out the client retries a second later."""


class NotInstalledError(LLMOSError):
    """A feature whose optional dependencies are not installed (501; the message names the extra)."""

    status_code = 501
    error_type = "server_error"
    default_code = "not_installed"


class InsufficientStorageError(LLMOSError):
    """The disk is full (ENOSPC). Whatever was being written is removed, the last good state kept (507)."""

    status_code = 507
    error_type = "server_error"
    default_code = "disk_full"


class ModelLoadError(LLMOSError):
    """A model's artifacts could not be loaded or validated."""

    status_code = 500
    error_type = "server_error"
    default_code = "model_load_failed"


class ArtifactError(InvalidRequestError):
    """A model file is corrupt, truncated, unsafe (pickle) or fails its hash check."""

    default_code = "invalid_artifact"


class SourceError(InvalidRequestError):
    """A model source could not be resolved or fetched."""

    default_code = "source_unavailable"


class EngineError(LLMOSError):
    """Generation failed inside the engine; the request fails, the engine stays up."""

    default_code = "engine_error"
