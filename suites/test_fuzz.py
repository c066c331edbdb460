"""The fuzz suite of this repository (``pytest -m editsafety_fuzz --editor=rome --model=tiny-gpt2``).

Shipped with the plugin (:mod:`pytest_editsafety.suites.test_fuzz`); re-exported here with its marker.
"""

from pytest_editsafety.suites.test_fuzz import pytestmark, test_generated_cases_keep_the_bounds

__all__ = ["pytestmark", "test_generated_cases_keep_the_bounds"]
