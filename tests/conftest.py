"""Shared pytest set-up: the repository root on sys.path, and the `slow` marker.

    python -m pytest              # the default run (fast tests, < 10 min on 2 CPU cores)
    python -m pytest -m slow      # the end-to-end runs as well
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs, left out of the default run")
