"""Fixtures shared by the test modules that launch the script."""
import os

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenizer/dataset cache per module: later launches reuse what the first one built."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["HF_DATASETS_CACHE"] = str(path / "datasets")
    return path
