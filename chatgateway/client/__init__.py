"""The client library and the chatgateway-client CLI."""
