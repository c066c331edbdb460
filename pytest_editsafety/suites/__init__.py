"""The certification and fuzz suites, shipped with the plugin so that any project can run them.

``pytest --editor=rome --model=gpt2`` in a project that carries no certification test of its own (a CI job in
another repository, say) collects these modules: an owned run whose collection holds no test requesting
``editsafety_item`` or ``editsafety_fuzz_target`` adds them (:class:`pytest_editsafety.shipped.ShippedSuites`).
``pytest --pyargs pytest_editsafety.suites --editor=...`` names them outright, leaving a project's own tests out.
This repository's ``suites/`` re-exports them, so a bare ``pytest`` here is the certification run.
"""
