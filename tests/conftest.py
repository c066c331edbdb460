"""Fixtures shared by the project's own tests."""

from __future__ import annotations

from pathlib import Path

import pytest
# imported before any in-process pytester run: such a run restores sys.modules afterwards, so torch first imported
# inside one (checking an --editsafety-hparams file reads the editor's dataclass; a tokenizer library likewise) is
# dropped and imported again by the next, which crashes the process with a segfault (seen on an xdist worker
# running tests/test_plugin_inert.py's settings test twice)
import torch  # noqa: F401
import transformers  # noqa: F401


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro organism (the organism's real build path, in seconds), saved as a local model directory."""
    from pytest_editsafety.zoo.build import build_recipe
    from tests.zoo_helpers import micro_recipe

    return build_recipe(micro_recipe(), progress=False, root=tmp_path_factory.mktemp("micro-zoo"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny-tensor tests: on a shared 2-core machine a second thread only
    adds contention (seen: 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``make test`` asks for ``--dist loadgroup`` so that each organism is loaded by one worker; pytest 9.2
    drops the ``@group`` suffix xdist schedules by (pytest-xdist #1386), so put it back in this project's own
    runs (the plugin does so only in runs it owns)."""
    if hasattr(config, "workerinput") and config.getvalue("loadgroup"):
        from pytest_editsafety.xdist_glue import restore_group_suffixes

        restore_group_suffixes(items)
