"""The CPUs this process may use: its affinity mask and a cgroup CPU quota.

A module of its own, below everything that sizes thread or process pools by it
(:mod:`teal_cli.runtime.device` for torch's threads, :mod:`teal_cli.pipeline.loaders` for the loaders), so
that those import it rather than each other. Standard library only.
"""

from __future__ import annotations

import math
import os
from typing import Callable


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a
    container's or a batch job's ``--cpus``, which the mask does not show)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time per second allowed to this process by its cgroup and the cgroups
    above it (the smallest quota: v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``),
    or None when there is none or it cannot be read."""
    try:
        with open(membership) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "" and path and os.path.exists(os.path.join(root, "cgroup.controllers")):
            quotas += _cgroup_quotas(root, path, _cpu_max)  # v2, the unified hierarchy at root
        elif "cpu" in controllers.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if os.path.isdir(os.path.join(root, mount)):
                    quotas += _cgroup_quotas(os.path.join(root, mount), path, _cfs_quota)
                    break
    return min(quotas) if quotas else None


def _cgroup_quotas(mount: str, path: str, read: Callable[[str], float | None]) -> list[float]:
    """Quotas of the cgroup at ``path`` under ``mount`` and of its ancestors. Inside a cgroup
    namespace (a container) the path is "/" and the mount is the container's own cgroup."""
    found = []
    folder = os.path.normpath(os.path.join(mount, path.lstrip("/")))
    if not os.path.isdir(folder):
        folder = mount
    while True:
        quota = read(folder)
        if quota is not None:
            found.append(quota)
        if folder == os.path.normpath(mount):
            return found
        folder = os.path.dirname(folder)


def _cpu_max(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _cfs_quota(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as f, open(os.path.join(folder, "cpu.cfs_period_us")) as g:
            quota, period = int(f.read()), int(g.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None
