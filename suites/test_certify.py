"""The certification suite of this repository: a bare ``pytest`` here runs it (``testpaths``).

The test itself ships with the plugin (:mod:`pytest_editsafety.suites.test_certify`), so that a project without
this file gets the same suite; a project may re-export it like this to keep it in its own collection.
"""

from pytest_editsafety.suites.test_certify import test_edit_is_safe

__all__ = ["test_edit_is_safe"]
