"""Who may read the HTTP server, and what a browser may do with what it serves.

Every response forbids what the status page does not need: no inline script or style,
no other origin, no framing, no MIME sniffing. With ``http_token`` set, a request must
carry it (``Authorization: Bearer``, or ``?token=`` for what a browser cannot give a
header to, such as an EventSource or the page's first load). Without it (loopback), a
request must be for a loopback name: a page of another site whose name was made to
point at 127.0.0.1 (DNS rebinding) is that site's own origin to the browser, which lets
it read what it is answered; only the Host it names tells it apart.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable

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


def require_token(token: str, refusal_due: Callable[[], bool] | None = None) -> Middleware:
    """A middleware answering 401 to any request without the token. Digests of equal
    length are compared, in constant time: neither the token's bytes nor its length
    show in how long a refusal takes.

    Put before the pacing of requests, it refuses at once, and the connection with it:
    clients without the token neither take the turns of those that have it nor hold
    places waiting for one of their own (130 connections asking without it, 50
    requests at a time, had every request with the token closed unanswered, and its
    event stream cut). ``refusal_due``: whether a refusal may be answered now (their
    own pace); when not, the connection is closed unanswered."""
    expected = hashlib.sha256(token.encode()).digest()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = hashlib.sha256(given_token(request).encode()).digest()
        if not hmac.compare_digest(given, expected):
            if refusal_due is not None and not refusal_due():
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=503)  # (to no one: the connection is gone)
            refusal = web.Response(
                status=401,
                text="401: this daemon asks for its http_token (Authorization: Bearer TOKEN "
                     "or ?token=TOKEN)\n",
                headers={"WWW-Authenticate": 'Bearer realm="pieced"'})
            refusal.force_close()
            return refusal
        return await handler(request)

    return middleware


# The names a request may give in its Host (with or without a port) when no token is
# asked for, besides the address the connection came to (the http_host it listens on).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_LOOPBACK_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
# host [":" port]: a bracketed IPv6 address or a name without colons, and digits.
_AUTHORITY = re.compile(r"(?:\[([^\]]*)\]|([^:\[\]]*))(?::[0-9]*)?")
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _listening(request: web.Request) -> _Address | None:
    """The address the request's connection came to: the http_host listened on when
    that is an address of its own (127.0.0.2, say), as a browser would name it."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple) or not sockname:
        return None
    try:
        return ipaddress.ip_address(str(sockname[0]).partition("%")[0])
    except ValueError:
        return None


def _is_ours(host: str, bracketed: bool, listening: _Address | None) -> bool:
    """Whether a host (lower case, no brackets, no port) names this machine's loopback:
    ``localhost``, 127.0.0.1, ::1 or the address listened on. Addresses are compared as
    addresses ([0:0::1] is [::1]); an IPv6 one only in brackets, an IPv4 one not."""
    if host == "localhost" and not bracketed:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if bracketed != (addr.version == 6):
        return False
    return addr in _LOOPBACK_ADDRESSES or addr == listening


def _host_header_is_ours(value: str, listening: _Address | None) -> bool:
    m = _AUTHORITY.fullmatch(value.strip().lower())
    if m is None:
        return False
    if m.group(1) is not None:
        return _is_ours(m.group(1), True, listening)
    return _is_ours(m.group(2), False, listening)


def for_this_machine(request: web.Request) -> bool:
    """Whether every host the request names is one of this machine's loopback names:
    each Host header, and the host of the request's URL, which is that of an absolute
    request line (``GET http://HOST/``: it takes precedence over the Host header) or
    else the Host's. A request that names none (HTTP/1.0 without a Host) is from no
    browser: its URL is the address it came to, taken."""
    listening = _listening(request)
    if not all(_host_header_is_ours(v, listening) for v in request.headers.getall("Host", [])):
        return False
    try:
        host = (request.url.host or "").lower()
    except ValueError:  # (no URL can be made of what it gave)
        return False
    return _is_ours(host, ":" in host, listening)


def require_loopback_host() -> Middleware:
    """A middleware answering 421 Misdirected Request to a request for any other host
    than this machine's loopback names (see :func:`for_this_machine`): what a page
    that rebound its own name to 127.0.0.1 asks for. /healthz too: one rule for every
    route, and monitoring on this machine asks for 127.0.0.1 or localhost."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not for_this_machine(request):
            names = list(LOOPBACK_NAMES)
            listening = _listening(request)
            if listening is not None and listening not in _LOOPBACK_ADDRESSES:
                names.append(f"[{listening}]" if listening.version == 6 else str(listening))
            raise web.HTTPMisdirectedRequest(
                text=f"421: this daemon answers requests for {', '.join(names)} only (as "
                     "the Host header, with or without the port); with http_token set, "
                     "for any name\n")
        return await handler(request)

    return middleware
