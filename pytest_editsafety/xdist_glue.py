"""pytest-xdist glue for the runs the plugin owns: one GPU per worker, ``-n auto`` = number of GPUs,
``--dist loadgroup`` by default, a crash-safe group scheduler.

A run is owned when an editsafety option is given (``plugin.options_given``); any other run, including
one that merely collects the certification suite, keeps xdist's own behaviour. Nothing here is a
module-level hook: the plugin registers ``ControllerXdist`` on an owned run's controller and
``WorkerXdist`` on the workers that controller configured, both from its ``pytest_configure`` (pytest
calls a role's own ``pytest_configure`` as it is registered), and answers xdist's ``-n auto`` question,
asked before configuration, with ``auto_num_workers`` in owned runs.

The controller never imports torch: it counts GPUs from ``CUDA_VISIBLE_DEVICES`` (the caller's choice wins)
or from ``nvidia-smi -L`` in a subprocess, and hands each worker one device through ``workerinput``. The
worker pins itself by narrowing ``CUDA_VISIBLE_DEVICES`` while it is configured, before anything can
initialise CUDA, so ``cuda:0`` in the worker is its own GPU. CPU-only machines are left alone. Every xdist
hook is optional, so the roles load whether or not xdist is installed.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

log = logging.getLogger(__name__)

DEVICE_KEY = "editsafety_device"
LOADGROUP_KEY = "editsafety_loadgroup"
CPU = "cpu"
_DEVICES = pytest.StashKey[tuple[str, ...]]()


def parse_visible_devices(value: str) -> tuple[str, ...]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value names: indices or UUIDs, in order.

    CUDA stops at the first invalid entry; ``-1`` (or any negative index) is the usual way to hide every GPU.
    """
    devices: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return tuple(devices)


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


def device_for_worker(worker_id: str, devices: Sequence[str]) -> str:
    """Round-robin: worker ``gwN`` gets ``devices[N % len(devices)]``; ``"cpu"`` when there is no GPU."""
    if not devices:
        return CPU
    digits = "".join(ch for ch in worker_id if ch.isdigit())
    index = int(digits) if digits else 0
    return devices[index % len(devices)]


def _config_devices(config: pytest.Config) -> tuple[str, ...]:
    if _DEVICES not in config.stash:
        config.stash[_DEVICES] = visible_gpus()
    return config.stash[_DEVICES]


def dist_chosen_explicitly(config: pytest.Config) -> bool:
    """Whether the user asked for a distribution mode (``--dist``, ``-d``) anywhere pytest reads options."""
    args = [str(a) for a in config.invocation_params.args]
    args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    try:
        args += [str(a) for a in config.getini("addopts")]
    except (ValueError, KeyError):
        pass
    return any(a == "-d" or a == "--distload" or a.startswith("--dist") for a in args)


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
    """The controller of an owned run: ``--dist loadgroup`` unless the user chose a mode, a device for each
    worker, and the crash-safe group scheduler."""

    def pytest_configure(self, config: pytest.Config) -> None:
        # -n N without --dist: xdist picks load; grouping by (model, editor) keeps a model on one worker
        if getattr(config.option, "dist", "no") == "load" and not dist_chosen_explicitly(config):
            config.option.dist = "loadgroup"

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        devices = _config_devices(node.config)
        device = device_for_worker(str(node.gateway.id), devices)
        node.workerinput[DEVICE_KEY] = device
        # workers parse the original command line, so a dist mode set here must travel explicitly
        node.workerinput[LOADGROUP_KEY] = node.config.getoption("dist", "no") == "loadgroup"
        log.info("worker %s gets device %s", node.gateway.id, device)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """``loadgroup`` that does not re-run the test a worker crashed on (see ``crash_safe_loadgroup``)."""
        if config.getvalue("dist") != "loadgroup":
            return None
        scheduler_class = crash_safe_loadgroup()
        return None if scheduler_class is None else scheduler_class(config, log)


class WorkerXdist:
    """A worker of an owned run (its ``workerinput`` carries ``DEVICE_KEY``): pinned to its device, its
    groups' node ids restored."""

    def pytest_configure(self, config: pytest.Config) -> None:
        workerinput = config.workerinput  # type: ignore[attr-defined]
        if workerinput.get(LOADGROUP_KEY):
            config.option.loadgroup = True
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
