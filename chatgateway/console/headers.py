"""The console's response headers: a strict Content-Security-Policy and its companions.

No inline script or style, nothing from another origin: scripts, styles and images come
from the gateway itself, and the pages may connect only to it (fetch, and its WebSocket at
ws:// or wss:// of the same host: CSP's 'self' covers ws: only in newer browsers, so the
host is named as well). Forms never submit (the scripts handle them), and no other site
may frame the pages.
"""

import re

# A Host header we are willing to put into the policy: a name or address and a port, nothing
# that could end the directive (``;``, spaces, quotes) and add one of its own.
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def content_security_policy(host):
    """The policy for a page requested with ``host`` (the Host header, text; may be empty)."""
    connect = "'self'"
    if host and _HOST.match(host):
        connect += f" ws://{host} wss://{host}"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def set_security_headers(request):
    """Sets the console's headers on a twisted.web ``request``."""
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    request.setHeader(b"content-security-policy", content_security_policy(host).encode("ascii"))
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"cross-origin-opener-policy", b"same-origin")
