"""Generated protobuf and gRPC modules for chat.v1 (see proto/generate.py)."""
