"""Shared test fixtures.

Tests never reach the Hugging Face Hub (HF_HUB_OFFLINE=1 is set before transformers or
huggingface_hub are imported). `leafe_cache` is the model cache for the whole session, so the
SmolLM2 conversion (~20 s) runs at most once per session; set LEAFE_CACHE to reuse a cache
across sessions (e.g. on CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def leafe_cache(tmp_path_factory: pytest.TempPathFactory):
    """$LEAFE_CACHE if set, else a session temp dir (exported as LEAFE_CACHE meanwhile)."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("LEAFE_CACHE"):
            mp.setenv("LEAFE_CACHE", str(tmp_path_factory.mktemp("leafe-cache")))
        yield Path(os.environ["LEAFE_CACHE"])
