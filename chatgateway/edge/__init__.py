"""The surfaces devices and applications reach: WebSocket, gRPC and HTTP (Connect, health, metrics)."""
