"""The names OpenTelemetry sees: the instrumentation scope, metric names, attribute keys."""

SCOPE = "chatgateway"

# Metric names (OpenTelemetry semantic conventions where one exists: rpc.client.call.duration).
ACTIVE_CONNECTIONS = "chatgateway.server.active_connections"
CONNECTION_DURATION = "chatgateway.server.connection.duration"
CONNECTION_CLOSES = "chatgateway.server.connection.closes"
RECEIVED_MESSAGES = "chatgateway.server.received.messages"
SENT_MESSAGES = "chatgateway.server.sent.messages"
FANOUT_DURATION = "chatgateway.fanout.duration"
FANOUT_DROPPED = "chatgateway.fanout.dropped"
RATE_LIMITED = "chatgateway.server.commands.rate_limited"
CONNECTS_REFUSED = "chatgateway.server.connects.refused"
DEPENDENCY_ERRORS = "chatgateway.dependency.errors"
RPC_CLIENT_CALL_DURATION = "rpc.client.call.duration"
CORE_CALLS_IN_FLIGHT = "chatgateway.core.calls.in_flight"
BREAKER_STATE = "chatgateway.core.breaker.state"

# Attribute keys.
TRANSPORT = "chatgateway.transport"
MESSAGE_KIND = "chatgateway.message.kind"
CLOSE_CODE = "chatgateway.close_code"
DEPENDENCY = "chatgateway.dependency"
STATE = "chatgateway.breaker.state"
ERROR_TYPE = "error.type"
RPC_SYSTEM = "rpc.system.name"
RPC_METHOD = "rpc.method"
RPC_STATUS = "rpc.response.status_code"
