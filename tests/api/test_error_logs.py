"""What a 500 logs: a database error's message can quote the row it refused (a model's SAS URL
among its values), so the log names where it failed and what the database names, not that."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.context import ServiceContext
from app.errors import install_error_handlers

pytestmark = pytest.mark.postgres_only

SECRET = "sig=never-in-a-log"


def test_a_database_error_s_500_logs_its_sqlstate_and_column_not_the_row(
    service_context: ServiceContext, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/refused")
    def refused() -> None:
        with service_context.engine.connect() as connection:
            connection.execute(text("CREATE TEMP TABLE refused_rows (url text, needed text NOT NULL)"))
            # A literal, not a parameter: the driver's DETAIL quotes the failing row itself.
            connection.execute(text(f"INSERT INTO refused_rows VALUES ('https://a/m.pkl?{SECRET}', NULL)"))

    caplog.set_level(logging.INFO)
    answer = TestClient(app, raise_server_exceptions=False).post("/refused")
    assert answer.status_code == 500 and SECRET not in answer.text
    [record] = [r for r in caplog.records if r.name == "mms.errors"]
    assert record.getMessage() == "request.unhandled_database_error"
    assert (record.sqlstate, record.column_name, record.table_name) == ("23502", "needed", "refused_rows")
    assert "in refused" in record.at  # where it failed: the frame, not the message
    logged = logging.Formatter().format(record) + repr(record.__dict__)
    assert SECRET not in logged
