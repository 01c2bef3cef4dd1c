"""Fixtures shared by every tier live in tests/fixtures/, one module per outside world."""
pytest_plugins = [
    "tests.fixtures.simulator",
    "tests.fixtures.redis",
    "tests.fixtures.prometheus",
    "tests.fixtures.gateway",
    "tests.fixtures.logscan",
    "tests.fixtures.load",
    "tests.fixtures.processes",
    "tests.fixtures.nginx",
    "tests.fixtures.s3",
]
