"""Typed errors of the core library, each tied to the gRPC status it becomes at the edge.

The core raises these (no gRPC imports here beyond the status-code enum); the serving layer
maps them to statuses in one place (`latentedit.rpc.serving.ErrorMappingInterceptor`).
"""

from __future__ import annotations

import grpc

# The status message travels in the `grpc-message` trailer, percent-encoded (up to 3 bytes
# per UTF-8 byte), and gRPC's metadata limit is 8 KiB: a message that repeats a 1 MiB input
# would turn the real status into RESOURCE_EXHAUSTED on the client. Every error message is
# therefore capped here, once, and `shown` keeps a repeated value short in the first place.
MAX_MESSAGE_BYTES = 2048
MAX_SHOWN_CHARS = 80


def cap_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` UTF-8 bytes, saying how long it was."""
    encoded = message.encode("utf-8", errors="replace")
    if len(encoded) <= limit:
        return message
    suffix = f"... [message cut: {len(message)} characters in all]"
    return encoded[: limit - len(suffix)].decode("utf-8", errors="ignore") + suffix


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """repr(value) for an error message, at most about `limit` characters (long inputs are cut)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 20 else f"{text[:limit]}... ({len(text)} characters)"


class LatentEditError(Exception):
    """Base class: an error with a status code and a message meant for the caller (capped)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = cap_message(str(message))
        super().__init__(message)
        self.message = message


class InvalidArgument(LatentEditError):
    """Bad shape, dtype, NaN, out-of-range value, unknown enum value, malformed payload."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LatentEditError):
    """Unknown model, layer, head, artifact or job."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LatentEditError):
    """A name is taken (e.g. by an artifact of another kind)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LatentEditError):
    """The request is valid but the system is not in a state to serve it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LatentEditError):
    """Queue full or request larger than allowed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LatentEditError):
    """A dependency is down, or the service is draining."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LatentEditError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LatentEditError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(LatentEditError):
    code = grpc.StatusCode.UNIMPLEMENTED


class RemoteError(LatentEditError):
    """An error a dependency service answered with, passed on with its own status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
