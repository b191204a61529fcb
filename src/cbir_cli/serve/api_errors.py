"""The error every route raises for a bad request: answered as JSON with its status."""

from __future__ import annotations

from ..errors import CbirError


class ApiError(CbirError):
    """An error answered to the client with an HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
