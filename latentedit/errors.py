"""Typed errors of the core library, each tied to the gRPC status it becomes at the edge.

The core raises these (no gRPC imports here beyond the status-code enum); the serving layer
maps them to statuses in one place (`latentedit.rpc.serving.ErrorMappingInterceptor`).
"""

from __future__ import annotations

import grpc


class LatentEditError(Exception):
    """Base class: an error with a status code and a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(LatentEditError):
    """Bad shape, dtype, NaN, out-of-range value, unknown enum value, malformed payload."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LatentEditError):
    """Unknown model, layer, head, artifact or job."""

    code = grpc.StatusCode.NOT_FOUND


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
