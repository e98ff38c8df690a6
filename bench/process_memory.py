"""Memory a soak watches besides the server's own metrics: the resident set of a process and all its descendants
(the gateway and its engine core; read from /proc, Linux), and the device memory in use (nvidia-smi). Each is
None where it cannot be read, so the same soak runs on a machine without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                # the command name (field 2) may hold spaces and parentheses: the parent id follows the last ')'
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        tree.setdefault(parent, []).append(int(name))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # ended, or a kernel thread


def tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid` and every process below it, or None where /proc does not say."""
    if not os.path.exists(f"/proc/{pid}/status"):
        return None
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _rss_bytes(p)
        todo.extend(tree.get(p, []))
    return total


def device_memory_used_bytes() -> int | None:
    """Memory in use on the GPUs nvidia-smi lists, together (all processes); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(int(line) for line in out.split() if line.strip()) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
