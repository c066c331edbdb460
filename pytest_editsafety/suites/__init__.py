"""The certification and fuzz suites, shipped with the plugin so that any project can run them.

``pytest --editor=rome --model=gpt2`` in a project that carries no editsafety test of its own (a CI job in
another repository, say) collects these modules: a command line that names an editor, a model or case sets but
no paths, whose collection holds no test of the plugin's fixtures, adds them
(:class:`pytest_editsafety.shipped.ShippedSuites`).
``pytest --pyargs pytest_editsafety.suites --editor=...`` names them outright, leaving a project's own tests out.
This repository's ``suites/`` re-exports them, so a bare ``pytest`` here is the certification run.
"""
