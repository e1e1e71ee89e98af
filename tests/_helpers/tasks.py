"""Builders of test_tasks*.py: where the real offline data is (a skip mark without it) and label counts."""

from __future__ import annotations

import collections

import pytest

from softprompt import tasks as T

DATA = T.resolve_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="offline data (../shared/data) not found")


def _label_counts(records):
    return collections.Counter(r["label"] for r in records)
