"""Which GPUs a process may use, from ``CUDA_VISIBLE_DEVICES``, and how a record names the worker and the
device it ran on.

Plain values without torch or pytest: the xdist controller counts and hands out GPUs with them before
anything imports torch, and the hub labels each record's device with them.
"""

from __future__ import annotations

__all__ = ["MAIN_WORKER", "device_label", "parse_visible_devices"]

# the worker a record names outside pytest-xdist (xdist's workers are "gw0", "gw1", ...)
MAIN_WORKER = "main"


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


def device_label(device: str, visible: str | None) -> str:
    """``device`` as torch names it in this process (``"cuda:0"``, ``"cpu"``), plus the GPU it is when
    ``CUDA_VISIBLE_DEVICES`` (``visible``) renumbers them: ``"cuda:0 (GPU 3)"``, ``"cuda:0 (GPU-8f2e...)"``.

    Every xdist worker of an owned run is pinned to one GPU, which it sees as ``cuda:0``; the entry says which.
    """
    kind, _, index = device.partition(":")
    if kind != "cuda" or visible is None:
        return device
    entries = parse_visible_devices(visible)
    position = int(index) if index.isdigit() else 0
    if position >= len(entries):
        return device
    entry = entries[position]
    return f"{device} (GPU {entry})" if entry.isdigit() else f"{device} ({entry})"
