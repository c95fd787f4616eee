"""Fixtures of the explainability tests (helpers in clinic_data.py)."""

from __future__ import annotations

import pytest

from candor.common.schema import Schema

from clinic_data import SCHEMA


@pytest.fixture
def schema() -> Schema:
    return Schema.from_dict(SCHEMA)
