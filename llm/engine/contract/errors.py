"""The error of a request parameter that is invalid or cannot be honoured."""

from __future__ import annotations


class SamplingParamsError(ValueError):
    """An invalid or unsupported sampling parameter; the message names it, `param` holds its name
    (None when it is not one parameter).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
