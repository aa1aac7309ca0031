"""The console under /console/ on HTTP_PORT (docs/console.md).

    /console/             the chat page          static/chat.html
    /console/operator     the operator page      static/operator.html
    /console/static/NAME  the pages' scripts and styles (a fixed list: no directory listing)
    /console/config.json  what the pages need to know: development mode or not
    /console/status.json  the operator's status: Authorization: Bearer <token with the admin scope>

Mounted only with CONSOLE_ENABLED (on with --dev); without it /console/ is 404 like any
unknown path. The pages hold no data: everything the operator page shows comes from
status.json, which answers 401 without a valid token and 403 without the admin scope.
"""

import json
from importlib import resources as package_files

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server, util

from chatgateway.auth.tokens import AuthError
from chatgateway.console.admin import ADMIN_SCOPE, is_admin
from chatgateway.console.headers import set_security_headers

# The files served, with their types; read once when the console is built.
STATIC_FILES = {
    "chat.html": "text/html; charset=utf-8",
    "operator.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "operator.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "connection.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def read_static_files():
    """{name: (content type, bytes)} of STATIC_FILES, from the package."""
    folder = package_files.files("chatgateway.console").joinpath("static")
    return {name: (kind, folder.joinpath(name).read_bytes()) for name, kind in STATIC_FILES.items()}


class _File(resource.Resource):
    isLeaf = True

    def __init__(self, kind, body):
        super().__init__()
        self._kind = kind.encode("ascii")
        self._body = body

    def render_GET(self, request):
        set_security_headers(request)
        request.setHeader(b"content-type", self._kind)
        request.setHeader(b"cache-control", b"no-cache")
        return self._body

    render_HEAD = render_GET


class _Json(resource.Resource):
    isLeaf = True

    def __init__(self, body):
        super().__init__()
        self._body = json.dumps(body, sort_keys=True).encode("utf-8")

    def render_GET(self, request):
        set_security_headers(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return self._body


def _answer(request, status, body, headers=()):
    if request.finished or getattr(request, "_disconnected", False):
        return
    set_security_headers(request)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    for name, value in headers:
        request.setHeader(name, value)
    request.write(json.dumps(body, sort_keys=True).encode("utf-8") + b"\n")
    request.finish()


class Status(resource.Resource):
    """GET /console/status.json: the StatusSampler's status, for a token with the admin scope."""

    isLeaf = True
    log = Logger()

    def __init__(self, verifier, sampler):
        super().__init__()
        self._verifier = verifier
        self._sampler = sampler

    def render_GET(self, request):
        d = defer.Deferred.fromCoroutine(self._render(request))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    async def _render(self, request):
        scheme, _, token = (request.getHeader(b"authorization") or b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            challenge = [(b"www-authenticate", b'Bearer realm="chatgateway console"')]
            _answer(request, 401, {"error": "an admin token is required (Authorization: Bearer)"}, challenge)
            return
        try:
            claims = await self._verifier.verify(token.strip())
        except AuthError as e:
            _answer(request, 401, {"error": f"token refused: {e}"}, [(b"www-authenticate", b"Bearer")])
            return
        if not is_admin(claims.claims):
            _answer(request, 403, {"error": f"the token lacks the {ADMIN_SCOPE} scope"})
            return
        _answer(request, 200, await self._sampler.status())

    def _failed(self, failure, request):
        self.log.failure("console status failed", failure)
        _answer(request, 500, {"error": "internal error"})


class Console(resource.Resource):
    """/console/: the pages, their files, config.json and status.json."""

    def __init__(self, verifier, sampler, dev=False, files=None):
        super().__init__()
        files = files if files is not None else read_static_files()
        static = resource.Resource()
        for name, (kind, body) in files.items():
            static.putChild(name.encode("ascii"), _File(kind, body))
        self.putChild(b"static", static)
        self.putChild(b"", _File(*files["chat.html"]))
        self.putChild(b"operator", _File(*files["operator.html"]))
        self.putChild(b"config.json", _Json({"dev": bool(dev), "admin_scope": ADMIN_SCOPE}))
        self.putChild(b"status.json", Status(verifier, sampler))

    def render_GET(self, request):
        # /console without its slash: the pages' relative links need it.
        return util.redirectTo(b"/console/", request)
