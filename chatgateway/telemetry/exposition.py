"""``GET /metrics``: the Prometheus text format of a Telemetry's registry."""

import json

from twisted.web import resource


class MetricsResource(resource.Resource):
    """``GET /metrics``: the Prometheus text format (OpenMetrics when asked for); 503 without a Telemetry.

    Rendered on the reactor thread, where the observed counts live (prometheus_client's
    own Twisted resource renders in a thread pool).
    """

    isLeaf = True

    def __init__(self, telemetry=None):
        super().__init__()
        self._telemetry = telemetry

    def render_GET(self, request):
        from prometheus_client import exposition

        if self._telemetry is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "telemetry is not configured"}).encode("utf-8")
        accept = request.getHeader(b"accept")
        encoder, content_type = exposition.choose_encoder(accept.decode("latin-1") if accept else None)
        body = encoder(self._telemetry.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
