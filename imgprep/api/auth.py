"""Who may talk to the server: the listen address and the bearer token.

There is always a token: ``serve.token``, or one generated on first start into
``<state dir>/serve.token`` (tokenfile.py). Every request must carry
``Authorization: Bearer <token>`` (HTTP Basic with the token as the password, any
user name, is accepted too: that is what IMGAPI's own clients can send), except
``GET /ping`` and ``GET /jobs/:uuid``: IMGAPI's client polls the latter on the
``workflow-api`` URL without credentials, so without them it answers the job's
public view only (jobview.py). Without ``serve.token`` in the config the server
listens on loopback only.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import re

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from imgprep.api.errors import ApiError
from imgprep.errors import InvalidInput

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/ping"})
JOB_PATH = re.compile(r"^/jobs/[^/]+$")  # GET: open, answered with the public view unless authenticated


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port). Port 0 picks a free port."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise InvalidInput(f"listen address {listen!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidInput(f"listen address {listen!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise InvalidInput(f"listen address {listen!r}: port must be 0-65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve an unauthenticated API beyond this machine."""
    if token is None and not is_loopback(host):
        raise InvalidInput(
            f"refusing to listen on {host} without authentication: set serve.token in the config file "
            "or listen on a loopback address (127.0.0.1, ::1)"
        )


def authorized(header: str, token: str) -> bool:
    scheme, _, credentials = header.strip().partition(" ")
    expected = token.encode()
    if scheme.lower() == "bearer":
        return hmac.compare_digest(credentials.strip().encode(), expected)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        _, sep, password = decoded.partition(b":")
        return bool(sep) and hmac.compare_digest(password, expected)
    return False


class TokenAuth:
    """ASGI middleware: 401 (IMGAPI's UnauthorizedError) unless the token matches."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        ok = self.token is None or (header is not None and authorized(header, self.token))
        scope.setdefault("state", {})["authenticated"] = ok
        if scope["path"] in OPEN_PATHS or (scope["method"] in ("GET", "HEAD") and JOB_PATH.match(scope["path"])):
            await self.app(scope, receive, send)
            return
        if not ok:
            log.info("unauthorized %s %s from %s", scope["method"], scope["path"], scope.get("client"))
            message = "missing or invalid credentials" if header else "authentication required"
            error = ApiError(401, "UnauthorizedError", message, headers={"WWW-Authenticate": 'Bearer realm="imgprep"'})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
