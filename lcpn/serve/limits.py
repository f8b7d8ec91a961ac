"""What the server accepts: upload sizes and counts, the bearer token, and the status of each refusal.

- A file over ``max_file_mb`` is read no further than the limit and answered 413; the request's
  other files are still answered. A decompression bomb (``images.ImageTooLarge``) is 413 too, any
  other unusable upload 422 with lcpn's reason.
- More than ``max_files`` files in one request is 413, and so is a body larger than all of them
  together could be (FastAPI's ``max_body_size``), checked while it streams in, before any file is
  kept: uploads are spooled by Starlette in the system's temporary folder, never under the models
  folder or a path taken from the request.
- With a token, every ``/v1/`` request needs ``Authorization: Bearer <token>`` (compared in
  constant time); the answer comes before the body is read. The page, ``/healthz`` and ``/docs``
  stay open: they hold nothing but code.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..images import ImageError, ImageTooLarge

MB = 1024 * 1024
# Multipart headers and boundaries on top of the files themselves.
MULTIPART_ALLOWANCE = MB
PROTECTED_PREFIX = "/v1/"


class FileTooLarge(ImageError):
    """An upload over ``--max-file-mb``, refused unread."""


@dataclass(frozen=True)
class Limits:
    max_files: int = 64
    max_file_mb: float = 20.0

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + MULTIPART_ALLOWANCE

    async def read(self, upload: UploadFile) -> bytes | FileTooLarge:
        """The upload's bytes, or ``FileTooLarge`` once it passes the limit (the rest is never read)."""
        data = await upload.read(self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:
            return FileTooLarge(f"file too large (over {self.max_file_mb:g} MB, the limit set by --max-file-mb)")
        return data


def status_of(error: ImageError) -> int:
    """413 for a file too large to take (bytes or pixels), 422 for one that is not a usable image."""
    return 413 if isinstance(error, (FileTooLarge, ImageTooLarge)) else 422


def too_many_files_handler(limits: Limits):
    """Starlette stops parsing past ``max_files`` (FastAPI's ``form_limits``) with a 400; it is a
    request too large, so the client is told 413, with the limit."""

    async def handle(request: Request, exc: HTTPException):
        if exc.status_code == 400 and str(exc.detail).startswith("Too many files"):
            detail = f"too many files in one request; at most {limits.max_files} are accepted (--max-files)"
            return JSONResponse({"detail": detail}, status_code=413)
        return await http_exception_handler(request, exc)

    return handle


class BearerToken:
    """ASGI middleware: ``/v1/`` requests without the right bearer token get 401 before their body is read."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX) and not self._allowed(scope):
            response = JSONResponse({"detail": "a valid token is needed: send the header 'Authorization: Bearer "
                                     "<token>'"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token)
