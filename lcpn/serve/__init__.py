"""``lcpn serve``: the HTTP API, dynamic batching, upload limits and the web page (``static/``)."""

from .app import create_app

__all__ = ["create_app"]
