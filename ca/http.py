"""The CA's HTTP/1.1 API: a small asyncio server meant for loopback.

Routes (a table: the admin routes of `ca.admin_api` plug in with `add_route`):

    GET  /ca.pem          the root certificate (PEM) - check its fingerprint out of band
    GET  /crl             the current CRL (DER, application/pkix-crl)
    POST /enrol           {"token": ..., "csr": PEM} -> 200 {"certificate": PEM}
                          400 malformed request or CSR, 403 refused token or CSR, 429 throttled
    POST /enroll          the same: an alias kept for clients of earlier versions
    POST /renew           {"certificate": PEM, "csr": PEM} -> 200 {"certificate": PEM}: a new
                          certificate for the same name and key; the CSR, signed by that key,
                          authenticates the request (`CertificateAuthority.renew`); 400, 403, 429
    POST /ocsp, POST /    an OCSP request (application/ocsp-request, RFC 6960 A.1) -> 200
                          application/ocsp-response, signed by the root key, nonce echoed
    GET  /ocsp/<base64>   the same, the request base64- and URL-encoded in the path
    GET  /healthz         "ok"

Every error is a JSON body `{"error": "..."}` with a precise status (404 unknown path, 405 wrong
method, 400 malformed, 411/413/415/431 for the limits below), never a traceback; OCSP errors
are OCSP responses (malformedRequest, unauthorized), as RFC 6960 wants. One request per
connection (`Connection: close`): the API is a handful of calls per node, so keep-alive would
only add state an attacker can hold open.

Limits, all named below: the request line and headers fit in MAX_HEAD, a body in MAX_BODY with
a Content-Length (required for POST; Transfer-Encoding is refused), the whole request arrives
within READ_TIMEOUT, at most MAX_CONNECTIONS are served at once, and a client address with
ENROL_FAILURES failed enrolments or renewals in ENROL_WINDOW seconds gets 429 until the window
slides.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

from ca.authority import CertificateAuthority
from ca.errors import EnrolmentError, EnrolmentRefused, RenewalRefused
from node.errors import NodeError, Unavailable, code_of

__all__ = [
    "DEFAULT_PORT",
    "CaHttpServer",
    "EnrolmentThrottle",
    "Handler",
    "Request",
    "Response",
    "json_fields",
]

log = logging.getLogger("kmsnet.ca")

DEFAULT_PORT = 8766
#: Request line + headers, terminator included.
MAX_HEAD = 8 * 1024
#: A request body (an enrolment: a token and a CSR of well under 1 KiB; an OCSP request: about 100 bytes).
MAX_BODY = 64 * 1024
#: Seconds for a whole request to arrive, and for a response to leave.
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
#: Connections served at once; more are answered 503 at once.
MAX_CONNECTIONS = 256
#: Failed enrolments (and renewals) per client address per window before 429.
ENROL_FAILURES = 10
ENROL_WINDOW = 60.0
#: Client addresses the throttle remembers (the least recently failing are forgotten first).
MAX_TRACKED_CLIENTS = 4096
#: On close, in-flight requests get this long to finish before they are cancelled.
SHUTDOWN_GRACE = 5.0
#: After an error, unread input is drained (at most this much, this long) before closing, so the
#: client reads our answer instead of a connection reset.
LINGER_BYTES = 4 * MAX_BODY
LINGER_TIMEOUT = 1.0

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_DIGITS = re.compile(r"[0-9]{1,19}")
_SINGLE = frozenset({"content-length", "content-type", "host", "transfer-encoding"})
#: Characters of a request path shown in logs and error messages.
_SHOWN_PATH = 100
OCSP_REQUEST = "application/ocsp-request"
OCSP_RESPONSE = "application/ocsp-response"


@dataclass(frozen=True)
class Request:
    """One parsed request: method, path (query string dropped), lower-cased headers, body, client address."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    client: str


@dataclass(frozen=True)
class Response:
    """One response; `Content-Length`, `Connection: close` and the safety headers are added when written."""

    status: HTTPStatus
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(
        cls, status: HTTPStatus, payload: Mapping[str, object], headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        """A JSON body."""
        return cls(status, json.dumps(payload).encode() + b"\n", "application/json", headers)

    @classmethod
    def error(cls, status: HTTPStatus, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """`{"error": message}`."""
        return cls.json(status, {"error": message}, headers)


Handler = Callable[[Request], Awaitable[Response]]


def _media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased ("" if absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def json_fields(
    request: Request, required: Mapping[str, type], optional: Mapping[str, type] | None = None
) -> dict[str, object] | Response:
    """The request's JSON object body if it holds exactly the `required` keys (and any of the
    `optional` ones) with values of the given types; else the 415/400 `Response` to send."""
    optional = optional or {}
    if _media_type(request) != "application/json":
        return Response.error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
    try:
        payload = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return Response.error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
    expected = {**optional, **required}
    shape = ", ".join(f'"{key}": {kind.__name__}' for key, kind in expected.items())
    if (
        not isinstance(payload, dict)
        or not set(required) <= set(payload) <= set(expected)
        # bool is an int to Python, never to the API.
        or any(not isinstance(value, expected[key]) or isinstance(value, bool) for key, value in payload.items())
    ):
        note = f" ({', '.join(optional)} optional)" if optional else ""
        return Response.error(HTTPStatus.BAD_REQUEST, f"expected {{{shape}}}{note}")
    return payload


class _HttpError(Exception):
    """A request refused while it was read."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.response = Response.error(status, message)


class EnrolmentThrottle:
    """Counts failed enrolments per client address in a sliding window.

    A client with `limit` failures in the last `window` seconds is refused until the oldest one
    ages out. Memory is bounded: at most `limit` timestamps per address and `max_clients` addresses.
    """

    def __init__(
        self,
        limit: int = ENROL_FAILURES,
        window: float = ENROL_WINDOW,
        *,
        max_clients: int = MAX_TRACKED_CLIENTS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._max_clients = max_clients
        self._monotonic = monotonic
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None if it may now."""
        failures = self._failures.get(client)
        if failures is None:
            return None
        now = self._monotonic()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        if len(failures) < self.limit:
            return None
        return failures[0] + self.window - now

    def failed(self, client: str) -> None:
        """Count one failed enrolment for `client`."""
        failures = self._failures.pop(client, None) or deque(maxlen=self.limit)
        failures.append(self._monotonic())
        self._failures[client] = failures  # most recently failing last
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)


class CaHttpServer:
    """The CA's HTTP API. `async with CaHttpServer(ca, port=0) as server:`, or start()/close()."""

    def __init__(
        self,
        authority: CertificateAuthority,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        throttle: EnrolmentThrottle | None = None,
    ) -> None:
        self.authority = authority
        self.host = host
        self._port = port
        self.throttle = throttle or EnrolmentThrottle()
        #: path -> method -> handler; and path prefix -> method -> handler, for paths that carry data.
        self.routes: dict[str, dict[str, Handler]] = {}
        self.prefix_routes: dict[str, dict[str, Handler]] = {}
        self.add_route("GET", "/ca.pem", self._ca_pem)
        self.add_route("GET", "/crl", self._crl)
        enrol = self._throttled(self._enrol_response)
        self.add_route("POST", "/enrol", enrol)
        self.add_route("POST", "/enroll", enrol)  # the spelling of earlier versions, still accepted
        self.add_route("POST", "/renew", self._throttled(self._renew_response))
        # `openssl ocsp -url http://HOST:PORT/` posts to "/", RFC 6960 clients to wherever the AIA says.
        self.add_route("POST", "/", self._ocsp_post)
        self.add_route("POST", "/ocsp", self._ocsp_post)
        self.add_route("GET", "/ocsp/", self._ocsp_get, prefix=True)
        self.add_route("GET", "/healthz", self._healthz)
        self._server: asyncio.Server | None = None
        #: The connections being served, each handler task with its writer.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def add_route(self, method: str, path: str, handler: Handler, *, prefix: bool = False) -> None:
        """Serve `method path` with `handler`: the exact path, or with `prefix` every path starting
        with it that no exact route serves (the longest prefix wins). A handler must not raise for
        bad input, it returns an error `Response`."""
        (self.prefix_routes if prefix else self.routes).setdefault(path, {})[method] = handler

    # --- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(self._connection, self.host, self._port, limit=MAX_HEAD)
        log.info("ca_http_started", extra={"fields": {"url": self.url}})

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish (up to SHUTDOWN_GRACE), then drop the rest."""
        if self._server is None:
            return
        self._server.close()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=SHUTDOWN_GRACE)
            # Aborting the socket ends a stalled handler's reads and writes, so it finishes by
            # itself; cancelling it instead makes asyncio's stream callback log an error (3.11).
            for task in pending:
                self._connections[task].transport.abort()
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
                for task in stuck:
                    task.cancel()
        await self._server.wait_closed()
        self._server = None
        log.info("ca_http_stopped", extra={"fields": {}})

    async def __aenter__(self) -> CaHttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None, "server not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """http://HOST:PORT of this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- one connection ---------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else "?"
        self._connections[task] = writer
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                busy = Response.error(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
                await self._finish(reader, writer, busy, linger=False)  # a flood must not hold sockets open
                return
            try:
                request = await _read_request(reader, client)
            except _HttpError as exc:
                await self._finish(reader, writer, exc.response)
                return
            if request is None:  # the client closed without asking anything
                return
            response = await self._dispatch(request)
            fields = {
                "client": client,
                "method": request.method,
                "path": request.path[:_SHOWN_PATH],
                "status": response.status.value,
            }
            log.info("http_request", extra={"fields": fields})
            await self._finish(reader, writer, response)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled reading our answer: nothing to tell it
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.wait_closed()

    async def _dispatch(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            prefixes = [p for p in self.prefix_routes if request.path.startswith(p)]
            methods = self.prefix_routes[max(prefixes, key=len)] if prefixes else None
        if methods is None:
            return Response.error(HTTPStatus.NOT_FOUND, f"no such resource: {request.path[:_SHOWN_PATH]}")
        handler = methods.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            return Response.error(HTTPStatus.METHOD_NOT_ALLOWED, f"use {allow}", (("Allow", allow),))
        try:
            return await handler(request)
        except Exception:
            # A handler bug answers 500: it must neither stop the server nor send a traceback.
            fields = {"method": request.method, "path": request.path[:_SHOWN_PATH]}
            log.exception("http_handler_failed", extra={"fields": fields})
            return Response.error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    async def _finish(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: Response, *, linger: bool = True
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *response.headers,
        ]
        head = f"HTTP/1.1 {response.status.value} {response.status.phrase}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
        writer.write(head.encode("latin-1") + response.body)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        if linger and response.status >= HTTPStatus.BAD_REQUEST and writer.can_write_eof():
            # The client may still be sending what we refused to read: drain a bounded amount so
            # that closing does not reset the connection before it has read the answer.
            writer.write_eof()
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(LINGER_TIMEOUT):
                    drained = 0
                    while drained < LINGER_BYTES:
                        chunk = await reader.read(MAX_HEAD)
                        if not chunk:
                            break
                        drained += len(chunk)

    # --- routes -------------------------------------------------------------------------------------------

    async def _ca_pem(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, self.authority.root_pem, "application/x-pem-file")

    async def _crl(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, self.authority.current_crl(), "application/pkix-crl")

    async def _healthz(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")

    def _throttled(self, answer: Callable[[Request], Response]) -> Handler:
        """A handler answering with `answer` unless the client failed too often lately (429);
        every answer but 200 counts as a failure."""

        async def handler(request: Request) -> Response:
            wait = self.throttle.retry_after(request.client)
            if wait is not None:
                seconds = str(max(1, int(wait + 0.999)))
                log.info("client_throttled", extra={"fields": {"client": request.client, "path": request.path}})
                return Response.error(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    f"too many failed requests; retry in {seconds} s",
                    (("Retry-After", seconds),),
                )
            response = answer(request)
            if response.status != HTTPStatus.OK:
                self.throttle.failed(request.client)
            return response

        return handler

    def _enrol_response(self, request: Request) -> Response:
        payload = json_fields(request, {"token": str, "csr": str})
        if isinstance(payload, Response):
            return payload
        return self._issuing(lambda: self.authority.enrol(str(payload["token"]), str(payload["csr"])))

    def _renew_response(self, request: Request) -> Response:
        payload = json_fields(request, {"certificate": str, "csr": str})
        if isinstance(payload, Response):
            return payload
        return self._issuing(lambda: self.authority.renew(str(payload["certificate"]), str(payload["csr"])))

    @staticmethod
    def _issuing(issue: Callable[[], bytes]) -> Response:
        """Run an enrolment or renewal and map its outcome: 200 with the certificate, 403 refused,
        400 malformed, 503 storage unavailable, 500 anything else."""
        try:
            pem = issue()
        except (EnrolmentRefused, RenewalRefused) as exc:
            return Response.error(HTTPStatus.FORBIDDEN, str(exc))
        except EnrolmentError as exc:
            return Response.error(HTTPStatus.BAD_REQUEST, str(exc))
        except Unavailable as exc:
            log.warning("issuing_unavailable", extra={"fields": {"error": str(exc)}})
            return Response.error(HTTPStatus.SERVICE_UNAVAILABLE, "the CA cannot issue right now")
        except NodeError as exc:
            log.error("issuing_failed", extra={"fields": {"error": code_of(exc), "detail": str(exc)}})
            return Response.error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        return Response.json(HTTPStatus.OK, {"certificate": pem.decode("ascii")})

    async def _ocsp_post(self, request: Request) -> Response:
        if _media_type(request) != OCSP_REQUEST:
            return Response.error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send an OCSP request as {OCSP_REQUEST}")
        return self._ocsp(request.body)

    async def _ocsp_get(self, request: Request) -> Response:
        # RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER request}. What does
        # not decode is passed on as empty bytes, which the responder answers malformedRequest.
        encoded = unquote(request.path.removeprefix("/ocsp/"))
        try:
            der = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            der = b""
        return self._ocsp(der)

    def _ocsp(self, der: bytes) -> Response:
        return Response(HTTPStatus.OK, self.authority.ocsp_response(der), OCSP_RESPONSE)


async def _read_request(reader: asyncio.StreamReader, client: str) -> Request | None:
    """Read one request within READ_TIMEOUT; None if the client sent nothing; `_HttpError` if refused."""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial.strip():
                    return None
                raise _HttpError(HTTPStatus.BAD_REQUEST, "incomplete request head") from exc
            except asyncio.LimitOverrunError as exc:
                raise _HttpError(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head over {MAX_HEAD} bytes"
                ) from exc
            method, path, headers = _parse_head(head)
            length = _content_length(method, headers)
            try:
                body = await reader.readexactly(length) if length else b""
            except asyncio.IncompleteReadError as exc:
                raise _HttpError(HTTPStatus.BAD_REQUEST, "body shorter than Content-Length") from exc
    except TimeoutError as exc:
        raise _HttpError(HTTPStatus.REQUEST_TIMEOUT, f"request not received within {READ_TIMEOUT:g} s") from exc
    return Request(method, path, headers, body, client)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    # The target must be an origin-form path of visible ASCII: nothing that could forge a log line.
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.1 only")
    path = target.decode("ascii").split("?", 1)[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # Obsolete line folding and whitespace before the colon are request-smuggling tools (RFC 9112 5.1-5.2).
        if not colon or not _TOKEN.fullmatch(name):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in _SINGLE:
                raise _HttpError(HTTPStatus.BAD_REQUEST, f"repeated {key} header")
            text = f"{headers[key]}, {text}"
        headers[key] = text
    return method.decode("ascii"), path, headers


def _content_length(method: str, headers: Mapping[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise _HttpError(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not supported; send a Content-Length")
    raw = headers.get("content-length")
    if raw is None:
        if method == "POST":
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length")
        return 0
    if _DIGITS.fullmatch(raw) is None:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    length = int(raw)
    if length > MAX_BODY:
        raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
    return length
