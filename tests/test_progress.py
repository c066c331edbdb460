"""Progress of a slow set-up as lines (editors.progress), and the hub handing them to its caller."""

from __future__ import annotations

import pytest

from editors.progress import ThrottledProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_at_most_every_interval_with_the_share_and_the_time_left_and_a_last_one() -> None:
    clock, lines = Clock(), []
    progress = ThrottledProgress("C at layer 5", 400, "tokens", lines.append, every=10.0, clock=clock)
    for _ in range(4):
        clock.now += 4.0
        progress.advance(50)
    # 16 s in, 200 of 400 done: one line (at 12 s, 150 done), none at 4, 8 or 16 s
    assert lines == ["C at layer 5: 150/400 tokens (38%), 12s spent, about 20s left"]
    clock.now += 70.0
    progress.advance(200)
    progress.finish()
    assert lines[1:] == ["C at layer 5: 400/400 tokens (100%), 1m26s spent, about 0s left",
                         "C at layer 5: 400 tokens in 1m26s"]


def test_a_measurement_quicker_than_the_interval_says_nothing() -> None:
    clock, lines = Clock(), []
    progress = ThrottledProgress("floor", 48, "cases", lines.append, every=10.0, clock=clock)
    for _ in range(48):
        clock.now += 0.1
        progress.advance()
    progress.finish()
    assert lines == []


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_the_floor_reports_its_progress_and_the_hub_hands_its_lines_on(monkeypatch) -> None:
    import editors.progress
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.floor import reference_medians
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    monkeypatch.setattr(editors.progress, "REPORT_EVERY_SECONDS", 0.0)
    handed: list[str] = []
    hub = ModelHub(build_plan(["rome"], ["tiny-gpt2"], ["normal"], limit=1), HubOptions(progress=handed.append))
    normal = [c for c in resolve_cases("normal").cases][:6]
    # root None: measured here, whatever another run's cache holds
    reference_medians(hub.prepared_editor("tiny-gpt2", "rome"), hub.loaded("tiny-gpt2"), normal,
                      key_fields={"editor": "rome"}, root=None, progress=hub._progress_line)
    assert handed[0].startswith("denominator floor of rome: reference cases: 1/6 cases (17%), ")
    assert handed[-1].startswith("denominator floor of rome: reference cases: 6 cases in ")
