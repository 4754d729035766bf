"""Test session settings: no Hub calls (fail at once instead of retrying), quiet tokenizers."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))


# The files whose module fixtures run for minutes (the README's quickstart, every benchmark's smoke run) are
# collected first, so that under `pytest -n 2 --dist loadfile` (make test) they start at once on the two workers
# and the short files fill in around them. The order of tests within a file is unchanged.
SLOW_FIRST = ("test_quickstart.py", "test_benchmarks.py", "test_wrn_tinyimagenet.py", "test_recipes.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept otherwise
