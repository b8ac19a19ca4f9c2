"""Packaging for Shepherd, the OpenAI-compatible LLM gateway (distribution ``shepherd-gateway``)."""

from setuptools import find_packages, setup

setup(
    name="shepherd-gateway",
    version="0.1.0",
    description="OpenAI-compatible LLM gateway on aiohttp: keys, limits, pooled upstreams, resumable streams",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["proxy", "proxy.*"]),
    package_data={"proxy": ["py.typed", "lua/*.lua",
                            # /ui/: the playground and status page, and vendored uPlot
                            "ui/*.html", "ui/*.js", "ui/*.css", "ui/*.svg", "ui/vendor/*",
                            "migrations/*/*.sql"]},  # the usage ledger's numbered migrations
    python_requires=">=3.11",
    install_requires=[
        "aiohttp>=3.14.4",  # request-smuggling fixes
        "uvloop>=0.21",
        "PyYAML>=6.0.2",
        "pydantic>=2.9",
        "orjson>=3.10",
        "msgspec>=0.19",  # decodes only the request fields the gateway reads
        "prometheus-client>=0.21",
        "redis>=5.2",
        "hiredis>=3.0",  # C reply parser for redis-py (the limits hot path)
        "aiosqlite>=0.20",  # the usage ledger on SQLite (the default)
        "asyncpg>=0.29",  # the usage ledger on PostgreSQL
    ],
    extras_require={
        "client": ["httpx>=0.27"],  # proxy.client.ResumableTransport only
        # observability.otlp_endpoint: one span per request over OTLP/HTTP (proxy.tracing)
        "otel": ["opentelemetry-sdk>=1.27", "opentelemetry-exporter-otlp-proto-http>=1.27"],
        "dev": [
            "pytest>=8.3",
            "pytest-aiohttp>=1.1",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "openai>=1.60",
            "websockets>=13",  # WebSocket tests; openai-python's realtime and responses.connect()
            "httpx>=0.27",
            "ruff>=0.8",
            "mypy>=1.13",
            "types-PyYAML>=6.0",
            "playwright>=1.45",  # drives Debian's chromium in tests/integration/test_ui.py
            "opentelemetry-sdk>=1.27",  # the otel extra, so tests/integration/test_metrics.py runs
            "opentelemetry-exporter-otlp-proto-http>=1.27",
            "opentelemetry-proto>=1.27",  # decodes OTLP in the test's receiver
        ],
    },
    entry_points={"console_scripts": ["shepherd = proxy.cli:main"]},
)
