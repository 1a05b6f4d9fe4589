"""One exception family for the runtime; the CLI turns them into one line and an exit code."""


class EdgerunError(Exception):
    """Base class of every error the runtime reports to a user."""


class BundleError(EdgerunError):
    """The bundle is missing, malformed, tampered with or not trusted."""


class RequestError(EdgerunError):
    """An inference request does not match the model (HTTP 400)."""
