"""Errors of the HTTP service. Each carries the HTTP status it is answered with; the message names the fix."""

from __future__ import annotations

from typing import ClassVar

from ..errors import SoftPromptError


class ServeError(SoftPromptError):
    """A request the server refuses; ``status`` is the HTTP status of the answer (always 4xx)."""

    status: ClassVar[int] = 400
    headers: ClassVar[dict[str, str]] = {}


class BadAdapterPathError(ServeError):
    """The adapter folder cannot be read or used (400)."""


class UnauthorizedError(ServeError):
    """An admin request without the right bearer token (401)."""

    status = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ServeError):
    """Admin endpoints off, or a path outside the adapter root (403)."""

    status = 403


class ConflictError(ServeError):
    """An adapter of that name is already loaded, or the server holds ``max_adapters`` adapters (409)."""

    status = 409


class TooLargeError(ServeError):
    """An adapter or a request larger than this server's limits; retrying the same thing can never succeed (413)."""

    status = 413


class BodyTimeoutError(ServeError):
    """The request body did not arrive within ``body_timeout_s`` (408)."""

    status = 408
