"""The fuzz suite: hypothesis searches for edit cases that break the certification bounds.

Not part of the default run (it searches for minutes): ``pytest -m editsafety_fuzz --editor=rome
--model=tiny-gpt2``. One test per (editor, model) of the run. Cases are built from the model's own world
and vocabulary (``pytest_editsafety.fuzz``), each one edited, measured, restored and judged by the harness
exactly as a certification test of ``--cases`` would be; the search is derandomized (the same cases on
every run) and shrinks the first failing case it finds, within ``--editsafety-fuzz-max-runs``
certification runs (default 4 x ``--editsafety-fuzz-examples``; at the cap the smallest failing case found
so far is reported). Every failing case found is written to a case file (``--editsafety-fuzz-out``,
default ``reports/fuzz-<editor>-<model>.json``, minimal case first) that the certification suite replays:
``pytest --editor=rome --model=tiny-gpt2 --cases=reports/fuzz-rome-tiny-gpt2.json``.
"""

from __future__ import annotations

import pytest

from pytest_editsafety.plugin import get_settings

pytestmark = pytest.mark.editsafety_fuzz


def test_generated_cases_keep_the_bounds(editsafety_fuzz_target, editsafety_hub, request: pytest.FixtureRequest
                                         ) -> None:
    from pytest_editsafety.cases import dump_cases
    from pytest_editsafety.fuzz import failure_case_set, fuzz_out_path, fuzz_target

    target = editsafety_fuzz_target
    settings = get_settings(request.config)
    findings = fuzz_target(editsafety_hub, target, max_examples=settings.fuzz_examples,
                           max_runs=settings.fuzz_max_runs)
    if not findings.failures:
        return
    cases = failure_case_set(findings, editor=target.editor, model=target.given)
    path = dump_cases(cases, fuzz_out_path(settings.fuzz_out, target))
    minimal = cases.cases[0]
    pytest.fail(
        f"{target.editor} on {target.given}: {len(cases)} failing case(s) in {findings.tried} tried; the minimal one:\n"
        f"  {minimal.rewrite_prompt!r} -> {minimal.target_new!r} (was {minimal.ground_truth!r}): "
        f"{minimal.metadata['fuzz_violations']}\n"
        f"written to {path}; replay with: pytest --editor={target.editor} --model={target.given} --cases={path}",
        pytrace=False,
    )
