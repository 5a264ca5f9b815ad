"""One API key for every door: the REST API, the Gradio page and its API, uploads, the live
websocket and `/metrics`.

`KeyGuard` is pure ASGI and sits outermost, so a request without a valid key is refused
before any of its body is read, whatever route or mounted app would answer it. A key comes
as each kind of client can send one: `Authorization: Bearer` (REST, OpenAI clients), the
`kyutai-api-key` header or `?auth_id=` (Kyutai's clients), `?api_key=` (a browser's
websocket cannot set headers) or the cookie the login page sets (the browser UI).
"""

import hmac
import html
from collections.abc import Collection
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from workers.settings import Settings

from .errors import AuthenticationError, error_response

LOGIN_PATH = "/login"
COOKIE = "moshi_key"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/readyz/live"})  # load balancers' probes carry no key
METRICS_PATH = "/metrics"
HOW = ("send the header 'Authorization: Bearer <key>' (or 'kyutai-api-key: <key>'), add '?api_key=<key>' "
       f"to a websocket's URL, or log in at {LOGIN_PATH} in a browser")
# A websocket's close reason must fit in 123 bytes.
WEBSOCKET_HOW = "an API key is needed: add ?api_key=<key> or send the kyutai-api-key header"
MAX_LOGIN_BYTES = 4096  # the login form is read before any key is known: a few bytes only


def presented_keys(scope: Scope) -> list[str]:
    """The keys a request carries, in the order they are tried."""
    headers = Headers(scope=scope)
    query = QueryParams(scope.get("query_string", b""))
    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    candidates = [bearer if scheme.lower() == "bearer" else "", headers.get("kyutai-api-key", ""),
                  query.get("api_key", ""), query.get("auth_id", ""),
                  cookie_parser(headers.get("cookie", "")).get(COOKIE, "")]
    return [key.strip() for key in candidates if key.strip()]


def is_known(key: str, keys: Collection[str]) -> bool:
    # Every key is compared, in constant time each: the time taken says nothing of the keys.
    matches = [hmac.compare_digest(key.encode(), known.encode()) for known in keys]
    return any(matches)


def find_key(scope: Scope, keys: Collection[str]) -> str:
    """The first key the request carries that is one of `keys`; AuthenticationError if none is."""
    given = presented_keys(scope)
    key = next((key for key in given if is_known(key, keys)), None)
    if key is None:
        raise AuthenticationError("unknown API key" if given else f"this server needs an API key: {HOW}")
    return key


def authenticate(scope: Scope, keys: Collection[str]) -> str:
    """The caller's API key ("" when the server has none). The guard's verdict is kept in the
    scope (`request.state.api_key`), so a route asking again costs nothing."""
    state = scope.setdefault("state", {})
    if "api_key" not in state:
        state["api_key"] = find_key(scope, keys) if keys else ""
    return state["api_key"]


def login_page(message: str = "", status: int = 200) -> HTMLResponse:
    """A self-contained page (no script, no other file) with one field for the key."""
    note = f'<p class="note">{html.escape(message)}</p>' if message else ""
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Moshi: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:26em;margin:12vh auto;padding:0 1em}}
input{{width:100%;padding:.5em;margin:.5em 0;box-sizing:border-box}}button{{padding:.5em 1.5em}}
.note{{color:#b00}}</style></head>
<body><h1>Moshi</h1><p>This server needs an API key. Paste yours:</p>{note}
<form method="post" action="{LOGIN_PATH}"><input name="key" type="password" autocomplete="current-password"
 autofocus required aria-label="API key"><button type="submit">Log in</button></form></body></html>
""", status_code=status)


class KeyGuard:
    """Refuses every HTTP request and websocket without a valid key, except the health probes
    and the login page; `/metrics` takes `metrics_key` alone when there is one."""

    def __init__(self, app: ASGIApp, keys: Collection[str], metrics_key: str | None = None) -> None:
        self.app, self.keys, self.metrics_key = app, frozenset(keys), metrics_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == LOGIN_PATH and self.keys and scope["type"] == "http":
            return await self._login(scope, receive, send)
        try:
            if path == METRICS_PATH and self.metrics_key:
                find_key(scope, (self.metrics_key,))
            elif path not in OPEN_PATHS:
                authenticate(scope, self.keys)
        except AuthenticationError as exc:
            return await self._refuse(scope, receive, send, str(exc))
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        if scope["type"] == "websocket":  # closed before it is accepted: the client sees HTTP 403
            return await send({"type": "websocket.close", "code": 1008, "reason": WEBSOCKET_HOW})
        headers = Headers(scope=scope)
        response: Response
        if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):
            response = RedirectResponse(LOGIN_PATH, status_code=303)  # a person at a browser
        else:
            response = error_response(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"},
                                      path=scope["path"])
        await response(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            return await login_page()(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        # Another site's form must not log a visitor in with a key of its choosing.
        if origin is not None and urlsplit(origin).netloc != headers.get("host"):
            return await login_page("Log in from this server's own page.", 403)(scope, receive, send)
        body = b""
        while len(body) <= MAX_LOGIN_BYTES:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        key = parse_qs(body[:MAX_LOGIN_BYTES].decode("utf-8", "replace")).get("key", [""])[0].strip()
        if not is_known(key, self.keys):
            return await login_page("That key is not one of this server's keys.", 401)(scope, receive, send)
        response = RedirectResponse("/", status_code=303)
        # HttpOnly: no script of the page can read the key; Strict: no other site's page sends it.
        response.set_cookie(COOKIE, key, httponly=True, samesite="strict", secure=scope["scheme"] == "https")
        await response(scope, receive, send)


def install_auth(app: FastAPI, settings: Settings) -> None:
    """The guard, outermost: call after adding every other middleware (a second call does nothing)."""
    if not any(m.cls is KeyGuard for m in app.user_middleware):
        app.add_middleware(KeyGuard, keys=settings.api_keys, metrics_key=settings.metrics_key)
