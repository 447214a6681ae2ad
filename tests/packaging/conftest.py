"""The packaging tests reuse the worker tests' session infrastructure (engine, registries,
the locally made base image): see tests/workers/conftest.py."""

from tests.workers.conftest import Infra, infra  # noqa: F401  (the fixture, re-exported)
