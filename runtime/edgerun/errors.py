"""One exception family for the runtime; the CLI turns them into one line and an exit code.

Each class carries the HTTP status the server answers with, so handlers never guess.
"""


class EdgerunError(Exception):
    """Base class of every error the runtime reports to a user."""

    http_status = 500


class BundleError(EdgerunError):
    """The bundle is missing, malformed, tampered with or not trusted."""

    http_status = 400


class RequestError(EdgerunError):
    """An inference request does not match the model (HTTP 400)."""

    http_status = 400


class SessionError(EdgerunError):
    """No variant/provider produced a working, golden-checked session."""

    http_status = 503


class ModelNotFoundError(EdgerunError):
    """The request names a model this server does not serve (HTTP 404)."""

    http_status = 404


class UnauthorizedError(EdgerunError):
    """Missing or wrong bearer token (HTTP 401)."""

    http_status = 401


class PayloadTooLargeError(EdgerunError):
    """The request body is over the configured limit (HTTP 413)."""

    http_status = 413


class OverloadedError(EdgerunError):
    """The inference queue is full or the server is draining (HTTP 503 + Retry-After)."""

    http_status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceTimeoutError(EdgerunError):
    """A request waited longer than its timeout for an inference slot (HTTP 504)."""

    http_status = 504
