"""Saves under faults: a kill at any point leaves the old file or the new one, never a partial one; temp files of
killed saves go on the next run; the data reaches the disk before the rename."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import torch
from safetensors import safe_open

import traintrain.files as files
from traintrain.files import atomic_write_text, remove_stale_temp_files, save_safetensors

ITERATIONS = 40
TENSOR_VALUES = 1 << 20  # 4 MB per save: long enough for kills to land inside a write


def saving_forever(path: Path, ready_fd: int) -> None:
    """The child: save `path` again and again, each version full of its own number (and saying so in its metadata)."""
    os.write(ready_fd, b"x")
    number = 0
    while True:
        number += 1
        save_safetensors(path, {"w": torch.full((TENSOR_VALUES,), float(number))}, {"number": str(number)})


def assert_complete(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        number = float(f.metadata()["number"])
        values = f.get_tensor("w")
    assert values.numel() == TENSOR_VALUES and bool((values == number).all()), "a version is whole, never mixed"


def test_killing_a_save_at_random_points_never_leaves_a_partial_file(tmp_path) -> None:
    rng = random.Random(0)
    path = tmp_path / "lora.safetensors"
    kills_with_temp = 0
    for _ in range(ITERATIONS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                saving_forever(path, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        os.read(read_fd, 1)
        os.close(read_fd)
        time.sleep(rng.uniform(0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        names = [p.name for p in tmp_path.iterdir()]
        kills_with_temp += any(name.endswith(".tmp") for name in names)
        if path.exists():
            assert_complete(path)
        remove_stale_temp_files(tmp_path)  # what the next run does first
        assert [p.name for p in tmp_path.iterdir()] in ([], ["lora.safetensors"]), "no temp file survives"
    assert kills_with_temp > 0, "some kills landed inside a write (else the test proves nothing)"


def test_a_temp_file_of_a_live_process_or_of_other_programs_is_left_alone(tmp_path) -> None:
    own = tmp_path / f".a.safetensors.{os.getpid()}.abcd1234.tmp"  # a save of this very process, in progress
    foreign = tmp_path / ".notes.txt.abcd1234.tmp"  # not one of this project's outputs
    dead = tmp_path / ".b.safetensors.999999999.abcd1234.tmp"  # a pid that cannot be running
    for path in (own, foreign, dead):
        path.write_bytes(b"x")
    old = time.time() - 2 * files.STALE_SECONDS
    os.utime(foreign, (old, old))
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert own.exists() and foreign.exists()


def test_an_old_temp_file_without_a_pid_is_removed_after_an_hour(tmp_path) -> None:
    fresh, old = tmp_path / ".a.safetensors.abcd1234.tmp", tmp_path / ".b.json.abcd1234.tmp"
    for path in (fresh, old):
        path.write_bytes(b"x")
    long_ago = time.time() - 2 * files.STALE_SECONDS
    os.utime(old, (long_ago, long_ago))
    assert remove_stale_temp_files(tmp_path) == [old] and fresh.exists()


def test_file_and_folder_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    atomic_write_text(tmp_path / "settings.json", "{}")
    assert events == ["fsync file", "rename", "fsync folder"]
