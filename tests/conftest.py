"""Shared test setup."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_model_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets an empty model-key cache of its own: no test reads or writes the user's cache directory."""
    monkeypatch.setenv("KEYDIFF_CACHE_DIR", str(tmp_path_factory.mktemp("keydiff-cache")))
    monkeypatch.delenv("KEYDIFF_NO_CACHE", raising=False)
