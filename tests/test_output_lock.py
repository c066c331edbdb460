"""One writer per certificate (pytest_editsafety.output_lock); the plugin's use of it is in test_plugin.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_editsafety.output_lock import OutputsInUseError, holding_outputs, lock_outputs


def test_a_held_output_is_refused_naming_its_holder_and_freed_on_release(tmp_path: Path) -> None:
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    held = lock_outputs([json_path, md_path], command="pytest --editor=rome")
    with pytest.raises(OutputsInUseError) as refused:
        lock_outputs([tmp_path / "other.json", md_path], command="second")
    message = str(refused.value)
    assert message.startswith(f"{md_path} is being written by another editsafety run (pid {os.getpid()} on ")
    assert "command: pytest --editor=rome" in message
    # the refused run holds nothing: the path it did get is free again
    lock_outputs([tmp_path / "other.json"]).release()
    held.release()
    held.release()  # idempotent
    assert list(tmp_path.iterdir()) == []  # no lock files left behind
    with holding_outputs([json_path, md_path]):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json.lock", "r.md.lock"]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_holder_never_leaves_a_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pytest_editsafety.output_lock import lock_outputs
        lock = lock_outputs([{str(tmp_path / 'r.json')!r}], command="the holder")
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputsInUseError, match=f"pid {holder.pid} .*command: the holder"):
            lock_outputs([tmp_path / "r.json"])
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # its lock file is still there (it never released), but the lock died with it
    assert (tmp_path / "r.json.lock").exists()
    lock_outputs([tmp_path / "r.json"]).release()
