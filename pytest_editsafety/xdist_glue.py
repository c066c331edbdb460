"""pytest-xdist glue for the runs the plugin owns: one GPU per worker, ``-n auto`` = number of GPUs, and a
crash-safe scheduler for users who choose ``--dist loadgroup``.

A run is owned when an editsafety option is given (``plugin.options_given``); any other run, including
one that merely collects the certification suite, keeps xdist's own behaviour. Nothing here is a
module-level hook: the plugin registers ``ControllerXdist`` on an owned run's controller and
``WorkerXdist`` on the workers that controller configured, both from its ``pytest_configure`` (pytest
calls a role's own ``pytest_configure`` as it is registered), and answers xdist's ``-n auto`` question,
asked before configuration, with ``auto_num_workers`` in owned runs.

Scheduling is xdist's own. Its default for ``-n N``, ``--dist load``, sends each worker runs of consecutive
tests from one queue in collection order, which is the plan's model-major order: every worker takes part in
every (model, editor), all of them finish one model before the next, so each worker loads a model once and
holds one at a time (the hub frees the previous model). When a worker crashes, ``load`` reports the test it
was running as failed and re-queues only the others. ``--dist loadgroup``, which the user may still choose,
keeps each (model, editor) on one worker (``plugin.xdist_group``), with the crash handling of
``crash_safe_loadgroup``.

The controller never imports torch: it counts GPUs from ``CUDA_VISIBLE_DEVICES`` (the caller's choice wins)
or from ``nvidia-smi -L`` in a subprocess, and hands each worker the GPU fewest live workers hold through
``workerinput``. The worker pins itself by narrowing ``CUDA_VISIBLE_DEVICES`` while it is configured, before
anything can initialise CUDA, so ``cuda:0`` in the worker is its own GPU. CPU-only machines are left alone.
Every xdist hook is optional, so the roles load whether or not xdist is installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from pytest_editsafety.devices import parse_visible_devices

log = logging.getLogger(__name__)

DEVICE_KEY = "editsafety_device"
CPU = "cpu"
_DEVICES = pytest.StashKey[tuple[str, ...]]()


def count_gpus_with_nvidia_smi(timeout: float = 10.0) -> int:
    """GPUs ``nvidia-smi -L`` lists; 0 when the tool is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("nvidia-smi failed: %s", err)
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def visible_gpus(environ: Any = None) -> tuple[str, ...]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (``("0", "1")``), without torch."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_visible_devices(env["CUDA_VISIBLE_DEVICES"])
    return tuple(str(i) for i in range(count_gpus_with_nvidia_smi()))


def least_used_device(devices: Sequence[str], in_use: Iterable[str]) -> str:
    """The device the fewest live workers hold (``in_use``: one entry per worker), the first such in order;
    ``"cpu"`` when there is no GPU. Workers started one after another get the GPUs round-robin, and a crashed
    worker's replacement (a new id to xdist) takes the GPU its predecessor left."""
    if not devices:
        return CPU
    held = list(in_use)
    return min(devices, key=lambda device: (held.count(device), devices.index(device)))


def _config_devices(config: pytest.Config) -> tuple[str, ...]:
    if _DEVICES not in config.stash:
        config.stash[_DEVICES] = visible_gpus()
    return config.stash[_DEVICES]


def auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per GPU; None leaves xdist's CPU-count default in place."""
    return len(_config_devices(config)) or None


def restore_group_suffixes(items: Sequence[pytest.Item]) -> None:
    """Restore xdist's ``@group`` nodeid suffix where pytest >= 9.2 dropped it (pytest-xdist #1386).

    ``--dist loadgroup`` groups tests by that suffix, which the worker writes into ``item._nodeid``; pytest
    9.2 keeps node ids in a structured ``item._id`` instead, so the write is lost and every test is
    scheduled on its own. Only where the suffix is missing, so a fixed xdist or an older pytest is left
    alone.
    """
    for item in items:
        groups = sorted({
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        })
        if not groups:
            continue
        nodeid = item.nodeid
        suffix = "@" + "_".join(groups)
        if nodeid.endswith(suffix):
            continue
        structured = getattr(item, "_id", None)
        parse = getattr(type(structured), "parse", None)
        if structured is None or parse is None:
            continue
        item._id = parse(nodeid + suffix)  # type: ignore[attr-defined]


class ControllerXdist:
    """The controller of an owned run: a GPU for each worker, and the crash-safe scheduler under
    ``--dist loadgroup``."""

    def __init__(self) -> None:
        # live worker id -> the device it was given
        self._given: dict[str, str] = {}

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        devices = _config_devices(node.config)
        device = least_used_device(devices, self._given.values())
        worker = str(node.gateway.id)
        self._given[worker] = device
        node.workerinput[DEVICE_KEY] = device
        log.info("worker %s gets device %s", worker, device)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        # called before xdist starts a crashed worker's replacement, which may then take this device
        self._given.pop(str(node.gateway.id), None)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """``loadgroup`` that does not re-run the test a worker crashed on (see ``crash_safe_loadgroup``)."""
        if config.getvalue("dist") != "loadgroup":
            return None
        scheduler_class = crash_safe_loadgroup()
        return None if scheduler_class is None else scheduler_class(config, log)


class WorkerXdist:
    """A worker of an owned run (its ``workerinput`` carries ``DEVICE_KEY``): pinned to its device, its
    groups' node ids restored under ``--dist loadgroup``."""

    def pytest_configure(self, config: pytest.Config) -> None:
        workerinput = config.workerinput  # type: ignore[attr-defined]
        device = workerinput.get(DEVICE_KEY)
        if device and device != CPU:
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        elif device == CPU:
            # CPU workers share the cores; without this every worker starts one thread per core
            count = int(workerinput.get("workercount", 1) or 1)
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if config.getvalue("loadgroup"):
            restore_group_suffixes(items)


def crash_safe_loadgroup() -> type | None:
    """xdist's ``LoadGroupScheduling`` with a crash handling that loses only the test in flight.

    On a crash, xdist's group scheduling puts the crashed worker's unfinished group back in the queue,
    the crashing test included, so the replacement worker runs it again and crashes again until xdist gives
    up (``--max-worker-restart``), and the rest of the group never runs. Here the crashed test is marked
    done (xdist reports it as failed) and only the others are re-queued. None when this xdist lacks the
    scheduler internals relied on, leaving xdist's own scheduler in charge.
    """
    try:
        from xdist.scheduler import LoadGroupScheduling
    except ImportError:
        return None
    if not all(hasattr(LoadGroupScheduling, name) for name in ("remove_node", "_pending_of", "_reschedule")):
        return None

    class CrashSafeLoadGroupScheduling(LoadGroupScheduling):  # type: ignore[misc, valid-type]
        def remove_node(self, node: Any) -> str | None:
            workload = self.assigned_work.pop(node)
            if not self._pending_of(workload):
                return None
            crashed: str | None = None
            for unit in workload.values():
                crashed = next((nodeid for nodeid, done in unit.items() if not done), None)
                if crashed is not None:
                    unit[crashed] = True
                    break
            self.workqueue.update(
                (scope, unit) for scope, unit in workload.items() if not all(unit.values())
            )
            for other in self.assigned_work:
                self._reschedule(other)
            return crashed

    return CrashSafeLoadGroupScheduling
