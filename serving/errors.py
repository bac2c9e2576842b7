"""Errors a request can end with, each carrying its HTTP status, a metrics reason and the field.

Kept free of kserve/fastapi imports so that validation (serving.schema) and the client stay light;
serving.server turns a ServingError into a JSON answer ``{"error", "reason", "field"}``.
"""

from __future__ import annotations

from typing import Callable

FieldNamer = Callable[[str], str]
"""Maps a canonical field path (``identities[0].image``) to the name the caller used on the wire
(``instances[0].identities[0].image`` in v1, ``id_images[0]`` in v2)."""


def same_name(path: str) -> str:
    return path


class ServingError(Exception):
    """A request that ends with a 4xx/5xx answer; ``str()`` is the message the caller sees."""

    def __init__(self, status: int, reason: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.field = field
        self.message = f"{field}: {message}" if field else message
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, str | None]:
        return {"error": self.message, "reason": self.reason, "field": self.field}


def bad_request(reason: str, message: str, field: str | None = None) -> ServingError:
    return ServingError(400, reason, message, field)


def too_large(reason: str, message: str, field: str | None = None) -> ServingError:
    return ServingError(413, reason, message, field)


def overloaded(limit: int, retry_after_s: int) -> ServingError:
    return ServingError(
        503, "overloaded",
        f"server busy: {limit} requests in flight or queued (serve.max_queue); retry after {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )


def timed_out(limit_s: float) -> ServingError:
    return ServingError(504, "timeout", f"request took longer than serve.request_timeout_s = {limit_s:g} s")


__all__ = ["ServingError", "FieldNamer", "same_name", "bad_request", "too_large", "overloaded", "timed_out"]
