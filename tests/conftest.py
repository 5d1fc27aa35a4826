"""Shared pytest set-up: the repository root on sys.path, the `slow` marker, the tiny LLaDA and maze base.

    python -m pytest              # the default run: fast tests only (about 2 minutes on 2 CPU cores)
    python -m pytest -m slow      # the end-to-end runs and the tests over about 4 s (about 27 minutes)
    python -m pytest tests/test_dtm_cli.py::test_resume_continues_after_the_last_finished_phase   # one, slow or not
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from seeded global generators (torch, numpy, random), so that what it draws without a
    generator of its own (a module's init, LoRA dropout, a helper's default draws) is the same whatever ran
    before it, alone or in the whole suite."""
    import random

    import numpy as np
    import torch
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(path, state): a tiny random LLaDA written once per test run (tests/llada_tiny.py); read-only."""
    from llada_tiny import write_tiny_llada
    path = str(tmp_path_factory.mktemp("tiny_llada"))
    return path, write_tiny_llada(path)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random maze MDM checkpoint (one layer, width 32), for end-to-end runs of dtm.py."""
    import torch
    from maze.mdm import MDM, Config, save
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "tiny.pt")
    save(MDM(Config(n_layer=1, n_head=2, d_model=32)), path)
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs, left out unless -m slow is given")


def named(config):
    """The node ids given on the command line (path::test...), relative to the rootdir as pytest writes them."""
    out = []
    for arg in config.args:
        if "::" in arg:
            path, rest = arg.split("::", 1)
            out.append(os.path.relpath(os.path.abspath(path), config.rootpath).replace(os.sep, "/") + "::" + rest)
    return out


def pytest_collection_modifyitems(config, items):
    if config.option.markexpr:                       # the user chose with -m: respect it
        return
    ids = named(config)                              # a slow test named by its node id runs
    slow = [item for item in items if "slow" in item.keywords
            and not any(item.nodeid == i or item.nodeid.startswith((i + "[", i + "::")) for i in ids)]
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if item not in slow]
