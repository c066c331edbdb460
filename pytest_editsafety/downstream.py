"""Downstream ability on the edited model: lm-evaluation-harness tasks, run on the model in memory.

``--editsafety-downstream TASKS`` (``certify(..., downstream=...)``) scores each task on the unedited model once
and on the model after every single edit; the records hold ``downstream_<task>`` (edited),
``downstream_<task>_unedited`` and ``downstream_<task>_drop`` (unedited minus edited), and the bound
``max_downstream_drop`` fails an edit whose drop exceeds it on any task. Tasks are lm-eval's own names (``piqa``,
``lambada_openai``: their data come through the Hugging Face cache) or the organisms' ``organism_mc`` and
``organism_cloze`` (:mod:`pytest_editsafety.zoo.tasks`, written locally). A task's score is its ``acc`` (else its
first reported metric). lm-eval is an optional extra (``pip install 'pytest-editsafety[downstream]'``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DownstreamError", "DownstreamTasks", "downstream_metrics", "require_lm_eval"]

INSTALL_HINT = "pip install 'pytest-editsafety[downstream]' (lm-evaluation-harness with its Hugging Face models)"
# the metric a task's score is, in order of preference (lm-eval names metrics "<metric>,<filter>")
PREFERRED_METRICS = ("acc,none", "exact_match,none", "acc_norm,none")


class DownstreamError(ValueError):
    """Downstream tasks that cannot run: lm-eval missing, an unknown task, a task without a score."""


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise DownstreamError(f"downstream tasks need lm-evaluation-harness, which is not installed: {INSTALL_HINT}")


def _score(task: str, results: dict[str, Any]) -> float:
    for name in PREFERRED_METRICS:
        if isinstance(results.get(name), (int, float)):
            return float(results[name])
    for name, value in results.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
            return float(value)
    raise DownstreamError(f"downstream task {task!r}: lm-eval reported no score ({sorted(results)})")


def _expected_warnings(record: logging.LogRecord) -> bool:
    """Drop lm-eval's warnings about being handed a loaded model, which is what this module means to do (they
    came twice per edit); every other record passes."""
    message = record.getMessage()
    return not ("`pretrained` model kwarg is not of type `str`" in message
                or "Passed an already-initialized model through `pretrained`" in message)


class DownstreamTasks:
    """Tasks scored on a model in memory; owned by a hub (the organisms' task files live under ``root``)."""

    def __init__(self, tasks: Sequence[str], *, limit: int | None, root: Path) -> None:
        require_lm_eval()
        self.tasks = tuple(tasks)
        self.limit = limit
        self._root = root
        self._manager: Any = None

    def _task_manager(self) -> Any:
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            from pytest_editsafety.zoo.tasks import ORGANISM_TASKS, write_organism_tasks

            include = None
            if any(task in ORGANISM_TASKS for task in self.tasks):
                include = str(write_organism_tasks(self._root / "downstream"))
            self._manager = TaskManager(include_path=include)
            unknown = [task for task in self.tasks if task not in self._manager.all_tasks]
            if unknown:
                raise DownstreamError(f"unknown downstream task(s) {', '.join(unknown)}: lm-eval's task names "
                                      f"(e.g. piqa, lambada_openai) or the organisms' organism_mc, organism_cloze")
        return self._manager

    def scores(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """Each task's score on ``model`` as it is now (no copy, no reload)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        manager = self._task_manager()
        device = next(model.parameters()).device
        wrapper_log = logging.getLogger("lm_eval.models.huggingface")
        wrapper_log.addFilter(_expected_warnings)
        try:
            wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32, device=str(device))
            out = simple_evaluate(model=wrapped, tasks=list(self.tasks), task_manager=manager, limit=self.limit,
                                  log_samples=False, bootstrap_iters=0, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        finally:
            wrapper_log.removeFilter(_expected_warnings)
        return {task: _score(task, out["results"][task]) for task in self.tasks}


def downstream_metrics(unedited: dict[str, float], edited: dict[str, float]) -> dict[str, float]:
    """The record's keys: each task's edited score, its unedited score and the drop between them."""
    metrics: dict[str, float] = {}
    for task, before in unedited.items():
        after = edited[task]
        metrics[f"downstream_{task}"] = after
        metrics[f"downstream_{task}_unedited"] = before
        metrics[f"downstream_{task}_drop"] = before - after
    return metrics
