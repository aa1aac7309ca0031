"""The committed chatgateway/api modules match proto/chat/v1 (run proto/generate.py when this fails)."""

import importlib.util

from support.processes import REPO_ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", REPO_ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_current():
    stale = load_generator().stale()
    assert stale == [], f"stale: {stale}; run `python proto/generate.py`"


def test_generation_rewrites_the_package_import():
    generated = load_generator().generate()
    assert "from chatgateway.api import chat_pb2" in generated["chat_pb2_grpc.py"]
    assert "from chat.v1 import" not in generated["chat_pb2_grpc.py"]
