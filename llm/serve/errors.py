"""The server's error answer: OpenAI's JSON error object with an HTTP status."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def opt_bool(body: dict[str, Any], name: str, param: str | None = None) -> bool | None:
    """body[name] if it is true, false or absent (None); else a 400 naming `param` (or name)."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{param or name}' must be true or false, got {short_repr(value)}",
                       param or name)
    return value


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
