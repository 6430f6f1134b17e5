"""The usable CPU count (affinity mask and cgroup quota) and the layer it lives in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[2] / "teal_cli"
# Modules the loaders (and tokenize) are built on: none of them may import, even lazily,
# anything that imports back into them.
LOWER = ("teal_cli.runtime.cpus", "teal_cli.runtime.device", "teal_cli.media.pixels", "teal_cli.media.resample", "teal_cli.media.io",
         "teal_cli.errors")


def _cgroup(tmp_path, membership: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self").write_text(membership)
    return str(root), str(tmp_path / "self")


@pytest.mark.parametrize("case, expected", [
    ("v2 none", None), ("v2 own", 2.5), ("v2 ancestor smaller", 1.5), ("v2 namespace", 3.0),
    ("v1 none", None), ("v1 own", 6.0), ("v1 merged mount", 0.5), ("unreadable", None)])
def test_cgroup_cpu_quota_is_the_smallest_on_the_way_up(tmp_path, case, expected):
    """A container's or job's CPU limit, which the affinity mask does not show, in either
    cgroup version, the tightest of the process's cgroup and its ancestors."""
    from teal_cli.runtime.cpus import cgroup_cpu_quota

    v2 = {"cgroup.controllers": "cpu io\n"}
    files = {
        "v2 none": ("0::/job\n", {**v2, "job/cpu.max": "max 100000\n"}),
        "v2 own": ("0::/a/job\n", {**v2, "a/cpu.max": "max 100000\n", "a/job/cpu.max": "250000 100000\n"}),
        "v2 ancestor smaller": ("0::/a/job\n", {**v2, "a/cpu.max": "150000 100000\n", "a/job/cpu.max": "400000 100000\n"}),
        "v2 namespace": ("0::/\n", {**v2, "cpu.max": "300000 100000\n"}),
        "v1 none": ("4:cpu,cpuacct:/docker/x\n0::/\n", {"cpu/docker/x/cpu.cfs_quota_us": "-1\n",
                                                        "cpu/docker/x/cpu.cfs_period_us": "100000\n"}),
        "v1 own": ("12:memory:/m\n4:cpu,cpuacct:/docker/x\n", {"cpu/docker/x/cpu.cfs_quota_us": "600000\n",
                                                                "cpu/docker/x/cpu.cfs_period_us": "100000\n"}),
        "v1 merged mount": ("3:cpuacct,cpu:/j\n", {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
                                                   "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}),
        "unreadable": ("0::/a\n", {**v2, "a/cpu.max": "garbage\n"}),
    }[case]
    root, membership = _cgroup(tmp_path, *files)
    assert cgroup_cpu_quota(root, membership) == expected
    assert cgroup_cpu_quota(root, str(tmp_path / "missing")) is None


def test_workers_and_torch_threads_follow_the_cpu_quota(monkeypatch):
    from teal_cli.pipeline import loaders
    from teal_cli.runtime import cpus
    from teal_cli.runtime.device import fit_threads_to_cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 2.5)
    assert cpus.usable_cpus() == 3 and loaders.default_workers() == 3
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: None)
    assert cpus.usable_cpus() == 32 and loaders.default_workers() == loaders.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 0.3)
    assert cpus.usable_cpus() == 1

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(4)
        assert fit_threads_to_cpus() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        torch.set_num_threads(4)
        assert fit_threads_to_cpus() == 4  # the user's setting stands
    finally:
        torch.set_num_threads(before)


def _imports(module: str) -> set[str]:
    """teal_cli modules ``module`` imports anywhere in its source (top level or in functions)."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        path = PACKAGE.joinpath(*module.split(".")[1:], "__init__.py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("teal_cli"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("teal_cli"))
    return {m for m in found if m != module}


def test_lower_layer_modules_never_import_the_loaders():
    """device -> loaders -> pixels -> resample -> device was a cycle (issue 16): what device
    and the loaders share (the CPU count) lives below both, in teal_cli.runtime.cpus."""
    seen, todo = set(), list(LOWER)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_imports(module))
    assert not {"teal_cli.pipeline.loaders", "teal_cli.pipeline.tokenize", "teal_cli.pipeline.prefetch"} & seen, sorted(seen)
    assert _imports("teal_cli.runtime.cpus") == set()  # the standard library only


def test_lower_layer_modules_import_and_run_without_the_loaders():
    """(torch-free, so it starts fast: fit_threads_to_cpus is checked in-process above)"""
    code = ("import sys, teal_cli.runtime.cpus, teal_cli.runtime.device, teal_cli.media.pixels, teal_cli.media.resample\n"
            "from teal_cli.media.pixels import PixelPrep\n"
            "assert teal_cli.runtime.cpus.usable_cpus() >= 1\n"
            "from PIL import Image\n"
            "teal_cli.media.pixels.MAX_RESIZED_PIXELS = 0  # the window-only resize: teal_cli.media.resample\n"
            "assert PixelPrep('shorter', 16, 3, crop=16).apply(Image.new('RGB', (40, 30)))[0].shape == (16, 16, 3)\n"
            "assert 'teal_cli.pipeline.loaders' not in sys.modules, 'loaders imported'\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
