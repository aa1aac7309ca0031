"""Regenerate chatgateway/api/ from proto/chat/v1/*.proto.

    python proto/generate.py            # write the modules
    python proto/generate.py --check    # exit 1 when the committed modules are stale

grpcio-tools writes absolute imports (``from chat.v1 import chat_pb2``); the
package ships the modules as ``chatgateway.api``, so that one import is
rewritten. The output depends only on the .proto files and grpcio-tools.
"""

import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "chatgateway", "api")
PROTOS = ["chat/v1/chat.proto"]
MODULES = ["chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py"]


def generate():
    """Return {module file name: text} generated from the .proto files."""
    import grpc_tools
    from grpc_tools import protoc

    wellknown = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        status = protoc.main(
            [
                "protoc",
                f"-I{HERE}",
                f"-I{wellknown}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *[os.path.join(HERE, p) for p in PROTOS],
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        generated = {}
        for name in MODULES:
            with open(os.path.join(tmp, "chat", "v1", name)) as f:
                text = f.read()
            generated[name] = re.sub(r"^from chat\.v1 import ", "from chatgateway.api import ", text, flags=re.M)
        return generated


def stale():
    """Names of committed modules that differ from a fresh generation."""
    differ = []
    for name, text in generate().items():
        path = os.path.join(OUT, name)
        if not os.path.exists(path) or open(path).read() != text:
            differ.append(name)
    return differ


def main(argv):
    if "--check" in argv:
        differ = stale()
        if differ:
            print("stale generated modules: " + ", ".join(differ), file=sys.stderr)
            return 1
        return 0
    for name, text in generate().items():
        with open(os.path.join(OUT, name), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
