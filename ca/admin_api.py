"""The CA's HTTP admin API: the rules of `kmsnet ca`'s admin commands, over HTTP.

    POST /admin/login           {"admin": NAME, "otp": "123456"}
                                -> {"session": SECRET, "admin", "role", "expires_at"}
    POST /admin/logout          -> {"ok": true}
    POST /admin/token           {"name": NODE[, "ttl": seconds]} -> {"name", "token", "expires_at"}
    POST /admin/revoke          {"name": NODE} or {"serial": HEX}[, "reason": REASON]
                                -> {"revoked": [certificate...], "crl_number"}
    GET  /admin/certificates    -> {"certificates": [certificate...]}
    GET  /admin/audit           -> {"entries": [...], "verified": N} (409 if the chain is broken)
    GET  /admin/admins          -> {"admins": [{"name", "role", "created", "locked_until"}...]}
    POST /admin/admins          {"name": NAME, "role": ROLE} -> {"name", "role", "otpauth"}
    POST /admin/admins/remove   {"name": NAME} -> {"ok": true}

Every route but login needs `Authorization: Bearer SECRET`, the session login returned: 15
minutes, bound to the administrator's role at login (`ca.admin`). The CA decides everything
and audits every refusal, exactly as for the command line: 401 for a failed login (without
saying whether the name or the code was wrong) or a missing, expired or ended session, 403 for
a role that does not allow the action, 429 while the administrator is locked out after wrong
codes, or while this client address has too many failures (Retry-After says how long), 400
malformed, 404 unknown name or serial, 409 a name taken or the last admin.

The session secret is a bearer token: whoever reads it acts as the administrator until it
expires. Serve this API on loopback (the default) or behind TLS, never in clear over a network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from http import HTTPStatus

from ca.admin import AdminSession
from ca.authority import CertificateAuthority
from ca.errors import (
    AdminExists,
    AdminLocked,
    AdminNotFound,
    AuthenticationFailed,
    CaError,
    CertificateNotFound,
    LastAdmin,
    PermissionDenied,
    SessionRequired,
)
from ca.http import CaHttpServer, EnrolmentThrottle, Handler, Request, Response, json_fields
from ca.issuance import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL
from node.errors import AuditChainBroken

__all__ = ["AdminApi"]

log = logging.getLogger("kmsnet.ca")

_Action = Callable[[Request, AdminSession | None], Response]


def _retry(wait: float | int) -> tuple[tuple[str, str], ...]:
    return (("Retry-After", str(max(1, int(wait + 0.999)))),)


def _bearer(request: Request) -> str | None:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    return secret.strip() if scheme.lower() == "bearer" and secret.strip() else None


class AdminApi:
    """The admin routes, for one authority: `AdminApi(authority).install(server)`."""

    def __init__(self, authority: CertificateAuthority, *, throttle: EnrolmentThrottle | None = None) -> None:
        self.authority = authority
        #: Failed logins and bad session tokens per client address (the CA also locks an
        #: administrator out after wrong codes, whoever sends them).
        self.throttle = throttle or EnrolmentThrottle()

    def install(self, server: CaHttpServer) -> None:
        """Add the admin routes to `server`."""
        server.add_route("POST", "/admin/login", self._login)
        routes: list[tuple[str, str, _Action]] = [
            ("POST", "/admin/logout", self._logout),
            ("POST", "/admin/token", self._token),
            ("POST", "/admin/revoke", self._revoke),
            ("GET", "/admin/certificates", self._certificates),
            ("GET", "/admin/audit", self._audit),
            ("GET", "/admin/admins", self._admins),
            ("POST", "/admin/admins", self._add_admin),
            ("POST", "/admin/admins/remove", self._remove_admin),
        ]
        for method, path, action in routes:
            server.add_route(method, path, self._authenticated(action))

    def _throttled(self, request: Request) -> Response | None:
        wait = self.throttle.retry_after(request.client)
        if wait is None:
            return None
        log.info("admin_client_throttled", extra={"fields": {"client": request.client}})
        return Response.error(HTTPStatus.TOO_MANY_REQUESTS, "too many failed admin requests", _retry(wait))

    async def _login(self, request: Request) -> Response:
        refused = self._throttled(request)
        if refused is not None:
            return refused
        payload = json_fields(request, {"admin": str, "otp": str})
        if isinstance(payload, Response):
            return payload
        try:
            session = self.authority.login(str(payload["admin"]), str(payload["otp"]))
        except AdminLocked as exc:
            return Response.error(HTTPStatus.TOO_MANY_REQUESTS, "locked out after wrong codes", _retry(exc.retry_after))
        except AuthenticationFailed:
            self.throttle.failed(request.client)
            # The CLI says which was wrong (its user holds the passphrase); a network client is not told.
            return Response.error(HTTPStatus.UNAUTHORIZED, "authentication failed")
        return Response.json(
            HTTPStatus.OK,
            {
                "session": session.secret,
                "admin": session.admin,
                "role": session.role,
                "expires_at": session.expires_at.isoformat(),
            },
        )

    def _authenticated(self, action: _Action) -> Handler:
        """A handler that resumes the bearer's session, runs `action` and maps the CA's refusals."""

        async def handler(request: Request) -> Response:
            refused = self._throttled(request)
            if refused is not None:
                return refused
            secret = _bearer(request)
            try:
                # No token at all: the action itself refuses it (and audits the attempt).
                session = self.authority.resume(secret) if secret is not None else None
                return action(request, session)
            except SessionRequired as exc:
                self.throttle.failed(request.client)
                return Response.error(HTTPStatus.UNAUTHORIZED, str(exc), (("WWW-Authenticate", "Bearer"),))
            except PermissionDenied as exc:
                return Response.error(HTTPStatus.FORBIDDEN, str(exc))
            except (AdminNotFound, CertificateNotFound) as exc:
                return Response.error(HTTPStatus.NOT_FOUND, str(exc))
            except (AdminExists, LastAdmin) as exc:
                return Response.error(HTTPStatus.CONFLICT, str(exc))
            except AuditChainBroken as exc:
                return Response.error(HTTPStatus.CONFLICT, str(exc))
            except CaError as exc:
                return Response.error(HTTPStatus.BAD_REQUEST, str(exc))

        return handler

    # --- the actions ----------------------------------------------------------------------------------

    def _logout(self, request: Request, session: AdminSession | None) -> Response:
        if session is None:
            raise SessionRequired("no admin session to end")
        self.authority.logout(session)
        return Response.json(HTTPStatus.OK, {"ok": True})

    def _token(self, request: Request, session: AdminSession | None) -> Response:
        payload = json_fields(request, {"name": str}, {"ttl": int})
        if isinstance(payload, Response):
            return payload
        ttl = payload.get("ttl", int(DEFAULT_TOKEN_TTL.total_seconds()))
        if not isinstance(ttl, int) or not 0 < ttl <= MAX_TOKEN_TTL.total_seconds():
            # Checked here: a huge number would overflow timedelta before the CA could refuse it.
            return Response.error(
                HTTPStatus.BAD_REQUEST, f"ttl must be 1..{int(MAX_TOKEN_TTL.total_seconds())} seconds"
            )
        issued = self.authority.token(str(payload["name"]), timedelta(seconds=ttl), session=session)
        return Response.json(
            HTTPStatus.OK, {"name": issued.name, "token": issued.secret, "expires_at": issued.expires_at.isoformat()}
        )

    def _revoke(self, request: Request, session: AdminSession | None) -> Response:
        payload = json_fields(request, {}, {"name": str, "serial": str, "reason": str})
        if isinstance(payload, Response):
            return payload
        name, serial_text = payload.get("name"), payload.get("serial")
        try:
            serial = int(str(serial_text), 16) if serial_text is not None else None
        except ValueError:
            return Response.error(HTTPStatus.BAD_REQUEST, "serial must be hexadecimal")
        revocation = self.authority.revoke(
            None if name is None else str(name),
            serial=serial,
            reason=str(payload.get("reason", "unspecified")),
            session=session,
        )
        now = self.authority.clock()
        return Response.json(
            HTTPStatus.OK,
            {
                "revoked": [record.to_json(now) for record in revocation.certificates],
                "crl_number": revocation.crl_number,
            },
        )

    def _certificates(self, request: Request, session: AdminSession | None) -> Response:
        records = self.authority.list(session=session)
        now = self.authority.clock()
        return Response.json(HTTPStatus.OK, {"certificates": [record.to_json(now) for record in records]})

    def _audit(self, request: Request, session: AdminSession | None) -> Response:
        count = self.authority.verify_audit(session=session)
        entries = self.authority.audit_entries(session=session)
        return Response.json(HTTPStatus.OK, {"entries": [entry.to_json() for entry in entries], "verified": count})

    def _admins(self, request: Request, session: AdminSession | None) -> Response:
        admins = self.authority.admins(session=session)
        return Response.json(HTTPStatus.OK, {"admins": [admin.to_json() for admin in admins]})

    def _add_admin(self, request: Request, session: AdminSession | None) -> Response:
        payload = json_fields(request, {"name": str, "role": str})
        if isinstance(payload, Response):
            return payload
        created = self.authority.add_admin(str(payload["name"]), str(payload["role"]), session=session)
        return Response.json(HTTPStatus.OK, {"name": created.name, "role": created.role, "otpauth": created.otpauth})

    def _remove_admin(self, request: Request, session: AdminSession | None) -> Response:
        payload = json_fields(request, {"name": str})
        if isinstance(payload, Response):
            return payload
        self.authority.remove_admin(str(payload["name"]), session=session)
        return Response.json(HTTPStatus.OK, {"ok": True})
