"""Calls to the core chat service: the gRPC client, its threads and its circuit breaker."""
