"""What keeps one client from stalling the server for everyone, and requests from meaning two things.

Three layers, from the socket up:

- :func:`guarded_protocol`: uvicorn's h11 protocol with deadlines and socket caps. A connection
  waiting for a request (just opened, or kept alive after a response) that sends nothing for
  ``idle_timeout_s`` is closed; one that has begun a request must finish its headers
  ``header_timeout_s`` after the wait began (slowloris: uvicorn alone waits for the rest of a
  started request forever). Open sockets are capped per client address (``max_client_sockets``)
  and in all (``max_sockets``, below the file-descriptor limit), and a newcomer past a cap takes
  the place of the longest-waiting connection that carries no request, rather than being turned
  away: a flood of idle sockets then costs its sender its own oldest sockets, never a newcomer's
  chance to be answered (a cap that refused newcomers shut out everyone, ``/healthz`` included,
  until the flood timed out). Past a per-client cap only connections that have waited
  ``EVICTABLE_AFTER_S`` are taken; past the total cap, the longest-waiting one whatever its age.
  A request h11 cannot parse gets the API's JSON error, and the connection is closed.
- :class:`RequestGuard`: an ASGI middleware that refuses a request carrying both
  ``Content-Length`` and ``Transfer-Encoding`` (400, connection closed: RFC 9112 6.1; behind a
  proxy that reads the other framing this is request smuggling), a ``Host`` outside
  ``allowed_hosts`` (400: DNS rebinding; IPv6 literals only in brackets), and, on a server without
  an API key, a state-changing request whose ``Origin`` is another site (403: any web page can
  POST a form to 127.0.0.1, and a key-less server has nothing else to tell its own page from
  that one). It answers HEAD as GET without the body, adds ``Content-Security-Policy``,
  ``X-Content-Type-Options: nosniff``, ``X-Frame-Options`` and ``Referrer-Policy`` to every
  response, and admits at most ``max_connections`` requests at once (past it a JSON 503 with
  Retry-After). ``/healthz`` is exempt from the cap: it costs nothing and is how an operator
  tells a busy server from a dead one.
- :class:`sentilens.serve.body.BodyLimit` (inside): the body cap and the body deadline.
"""

from __future__ import annotations

import ipaddress
import re
import resource
from urllib.parse import urlsplit

import anyio
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sentilens.serve.errors import error_response

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
EXEMPT_PATHS = ("/healthz",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def socket_cap(max_connections: int) -> int:
    """Open sockets allowed: room for kept-alive and slow clients, below the file-descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - 64 if soft != resource.RLIM_INFINITY else 1 << 16
    return max(1, min(max(8 * max_connections, 256), room))


EVICTABLE_AFTER_S = 1.0
"""How long a connection must have waited for a request before a newcomer may take its place. A client sends its
request as soon as it has connected, so only a connection that has sat this long without one is idle; younger ones
are spared, so a burst of real clients (accepted before any of their requests is read) is not cut."""


class Waiting:
    """The connections waiting for a request's headers, oldest first, overall and per client address."""

    def __init__(self) -> None:
        self.all: dict = {}  # insertion-ordered: the longest waiting first
        self.by_client: dict[str, dict] = {}
        self.sockets: dict[str, int] = {}  # open sockets per client address, waiting or not

    def opened(self, client: str) -> None:
        self.sockets[client] = self.sockets.get(client, 0) + 1

    def closed(self, protocol, client: str) -> None:
        self.stop_waiting(protocol, client)
        left = self.sockets.get(client, 1) - 1
        if left > 0:
            self.sockets[client] = left
        else:
            self.sockets.pop(client, None)

    def start_waiting(self, protocol, client: str) -> None:
        self.stop_waiting(protocol, client)
        self.all[protocol] = None
        self.by_client.setdefault(client, {})[protocol] = None

    def stop_waiting(self, protocol, client: str) -> None:
        self.all.pop(protocol, None)
        waiting = self.by_client.get(client)
        if waiting is not None:
            waiting.pop(protocol, None)
            if not waiting:
                del self.by_client[client]

    def oldest(self, client: str | None, older_than: float | None):
        """The longest-waiting connection (of ``client``, or of anyone) if it has waited since ``older_than``."""
        waiting = self.all if client is None else self.by_client.get(client, {})
        protocol = next(iter(waiting), None)
        if protocol is None or (older_than is not None and protocol.waiting_since > older_than):
            return None
        return protocol


def guarded_protocol(idle_timeout_s: float, header_timeout_s: float, max_sockets: int,
                     max_client_sockets: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with the idle and header deadlines and the socket caps (see module doc)."""
    waiting = Waiting()

    class GuardedH11Protocol(H11Protocol):
        deadline = None
        waiting_since = 0.0
        peer = ""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.peer = self.client[0] if self.client else ""
            waiting.opened(self.peer)
            if not self.make_room():
                transport.close()
                return
            self.start_waiting()

        def make_room(self) -> bool:
            """Close the longest-idle connection when this one passes a cap; False: no room for this one."""
            if waiting.sockets[self.peer] > max_client_sockets:
                idle = waiting.oldest(self.peer, self.loop.time() - EVICTABLE_AFTER_S)
                if idle is not None:
                    idle.close_idle()
            if len(self.connections) > max_sockets:
                idle = waiting.oldest(None, None)
                if idle is None:
                    return False
                idle.close_idle()
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_deadline()
            waiting.closed(self, self.peer)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            started = self.conn.their_state is h11.IDLE
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in
                self.disarm_deadline()
                waiting.stop_waiting(self, self.peer)
            elif started and self.deadline is not None and not self.transport.is_closing():
                # The first bytes of a request: its headers get the header deadline, counted from the wait's start.
                self.arm_deadline(self.waiting_since + header_timeout_s - self.loop.time())

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._unset_keepalive_if_required()  # the idle deadline below replaces uvicorn's keep-alive timer
                self.start_waiting()  # the next request has the same time as the first

        def start_waiting(self) -> None:
            self.waiting_since = self.loop.time()
            waiting.start_waiting(self, self.peer)
            self.arm_deadline(idle_timeout_s)

        def arm_deadline(self, seconds: float) -> None:
            self.disarm_deadline()
            self.deadline = self.loop.call_later(max(seconds, 0.0), self.deadline_passed)

        def disarm_deadline(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def deadline_passed(self) -> None:
            self.deadline = None
            if self.conn.their_state is h11.IDLE:
                self.close_idle()

        def close_idle(self) -> None:
            """Close a connection that has no request in progress (nothing is lost: it sent no whole request)."""
            waiting.stop_waiting(self, self.peer)
            self.disarm_deadline()
            if not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse: the API's JSON error shape, then the connection closed."""
            response = error_response(400, "bad_request", "malformed HTTP request: its request line, headers or "
                                      "framing could not be parsed", headers={"Connection": "close"})
            headers = [*response.raw_headers, *SECURITY_HEADERS]
            try:
                head = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
                self.transport.write(self.conn.send(head))
                self.transport.write(self.conn.send(h11.Data(data=response.body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass  # a response had already begun: closing is all that is left
            self.transport.close()

    return GuardedH11Protocol


class RequestGuard:
    """Framing, Host and Origin checks, HEAD, security headers and the request cap (see module doc)."""

    def __init__(self, app, allowed_hosts: list[str], max_requests: int, retry_after_s: int, check_origin: bool,
                 allowed_origins: list[str]):
        self.app = app
        self.allowed = {canonical_host(host.lower().strip("[]")) for host in allowed_hosts}
        self.max_requests = max_requests
        self.retry_after_s = retry_after_s
        self.check_origin = check_origin
        self.allowed_origins = {origin.strip().lower().rstrip("/") for origin in allowed_origins}
        self.active = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        async def refuse(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
            await error_response(status, code, message, headers=headers)(scope, receive, with_headers)

        names = [key for key, _ in scope["headers"]]
        if b"transfer-encoding" in names and b"content-length" in names:
            # Two framings: a proxy in front may have used the other one, so what follows on this connection
            # could be a smuggled request. Nothing of the body is read; the connection is closed.
            await refuse(400, "conflicting_framing", "a request may not carry both Content-Length and "
                         "Transfer-Encoding", {"Connection": "close"})
            return
        host, authority = request_host(scope)
        if host not in self.allowed:
            await refuse(400, "invalid_host", f"Host '{authority}' is not served here (allowed: "
                         f"{', '.join(sorted(self.allowed))}; see serve --allowed-host)")
            return
        if self.check_origin and scope["method"] not in SAFE_METHODS:
            origin = header(scope, b"origin")
            if (origin is not None and origin.strip().lower() not in self.allowed_origins
                    and not same_origin(origin, authority, scope.get("scheme", "http"))):
                await drain(receive)
                await refuse(403, "cross_origin", f"Origin '{origin}' is not this server ({authority}): a server "
                             "without an API key accepts requests from its own page, from clients that send no "
                             "Origin and from the pages of serve --allowed-origin", {"Connection": "close"})
                return
        if scope["method"] == "HEAD":
            # The same answer as GET; uvicorn, which still sees HEAD, leaves the body out.
            scope = {**scope, "method": "GET"}
        if scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, with_headers)
            return
        if self.active >= self.max_requests:
            await drain(receive)
            await refuse(503, "overloaded", f"{self.max_requests} requests are already being handled; retry later",
                         {"Retry-After": str(self.retry_after_s), "Connection": "close"})
            return
        self.active += 1
        try:
            await self.app(scope, receive, with_headers)
        finally:
            self.active -= 1


async def drain(receive, max_bytes: int = 1 << 20, timeout_s: float = 1.0) -> None:
    """Read (and drop) a small refused request's body before answering: closing a socket with unread data makes
    the kernel reset it, and the client then loses the 503 it was sent (measured: 76 of 200 burst clients got
    a connection error instead). Past ``max_bytes`` or ``timeout_s`` the rest is left to the connection close."""
    received = 0
    with anyio.move_on_after(timeout_s):
        while received <= max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


AUTHORITY = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[^\s\[\]:/@]+))(?::(?P<port>[0-9]*))?")
"""RFC 9110's Host: a name or IPv4 address, or an IPv6 literal in brackets, then an optional port; nothing else."""


def request_host(scope) -> tuple[str, str]:
    """The Host header's name (lower-case, without port or IPv6 brackets; '' when absent or malformed) and the
    header itself."""
    authority = (header(scope, b"host") or "").strip().lower()
    found = AUTHORITY.fullmatch(authority)
    if found is None:
        return "", authority
    if found["ipv6"] is not None:
        try:
            return ipaddress.IPv6Address(found["ipv6"]).compressed, authority
        except ValueError:
            return "", authority
    return found["name"], authority


def canonical_host(host: str) -> str:
    """An IPv6 address in its one compressed spelling (0:0::1 is ::1); any other name as it is."""
    try:
        return ipaddress.IPv6Address(host).compressed
    except ValueError:
        return host


DEFAULT_PORTS = {"http": "80", "https": "443"}


def same_origin(origin: str, authority: str, scheme: str) -> bool:
    """Whether a browser's ``Origin`` names the server the request was sent to (its Host, same scheme and port)."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme != scheme or not parts.netloc or parts.path or parts.query or parts.fragment:
        return False  # 'null' (a sandboxed or file: page) is never this server
    found, expected = AUTHORITY.fullmatch(parts.netloc), AUTHORITY.fullmatch(authority)
    if found is None or expected is None:
        return False

    def key(match: re.Match) -> tuple[str, str]:
        return (canonical_host(match["ipv6"] or match["name"]), match["port"] or DEFAULT_PORTS.get(scheme, ""))

    return key(found) == key(expected)
