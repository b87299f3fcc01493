"""Who may read the HTTP server, and what a browser may do with what it serves.

Every response forbids what the status page does not need: no inline script or style,
no other origin, no framing, no MIME sniffing. With ``http_token`` set, a request must
carry it (``Authorization: Bearer``, or ``?token=`` for what a browser cannot give a
header to, such as an EventSource or the page's first load).
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # the page's address may hold the token
    "Cross-Origin-Resource-Policy": "same-origin",
}


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, errors and streams included."""
    response.headers.update(HEADERS)


def given_token(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.query.get("token", "")


def require_token(token: str) -> Middleware:
    """A middleware answering 401 to any request without the token. Digests of equal
    length are compared, in constant time: neither the token's bytes nor its length
    show in how long a refusal takes."""
    expected = hashlib.sha256(token.encode()).digest()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = hashlib.sha256(given_token(request).encode()).digest()
        if not hmac.compare_digest(given, expected):
            raise web.HTTPUnauthorized(
                text="401: this daemon asks for its http_token (Authorization: Bearer TOKEN "
                     "or ?token=TOKEN)\n",
                headers={"WWW-Authenticate": 'Bearer realm="pieced"'})
        return await handler(request)

    return middleware
