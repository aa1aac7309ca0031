from twisted.application.service import ServiceMaker

chatgateway = ServiceMaker(
    "chatgateway",
    "chatgateway.tap",
    "Real-time WebSocket gateway between edge devices and the core chat service",
    "chatgateway",
)
chatcore = ServiceMaker(
    "chatcore",
    "chatgateway.devcore.tap",
    "Reference core chat service (gRPC), for development and tests",
    "chatcore",
)
