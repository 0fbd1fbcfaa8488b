"""matnet.memory: freed CPU memory kept for reuse (glibc malloc), as the `matnet` command sets it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from matnet import cli, memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _fault_count_has_no_signal() -> str:
    """Why counting page faults cannot show the setting here ('' where it can): another malloc preloaded, or
    transparent huge pages always on (a fresh mapping then faults once per 2 MiB, not per 4 KiB page)."""
    if os.environ.get("LD_PRELOAD"):
        return "LD_PRELOAD replaces glibc's malloc"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "transparent huge pages are always on" if "[always]" in f.read() else ""
    except OSError:
        return ""

# a few training steps of the tiny model, then the minor page faults of 5 more (a fresh process each time:
# the malloc setting is process-wide and cannot be undone)
FAULTS = """
import resource, torch, matnet
from matnet.memory import keep_freed_memory
print(keep_freed_memory())
torch.set_num_threads(1)
torch.manual_seed(0)
model = matnet.MatNet(matnet.MatNetConfig.preset("tiny"))
x = torch.bernoulli(torch.full((64, 1, 28, 28), 0.3))
for _ in range(3):
    model(x).loss.backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    model(x).loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(keep: str) -> tuple[str, float]:
    env = {**os.environ, memory.ENV: keep}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
@pytest.mark.skipif(bool(_fault_count_has_no_signal()), reason=_fault_count_has_no_signal())
def test_kept_memory_removes_the_page_faults_of_each_step():
    applied_default, default = _faults_per_step("0")
    applied, kept = _faults_per_step("1")
    assert (applied_default, applied) == ("False", "True")
    # glibc's default maps each step's large activations afresh: thousands of faults per step
    assert default > 500, default
    # kept: almost none (0.2 per step here with one OpenMP thread, 79 with OMP_NUM_THREADS=4, against 5,400)
    assert kept < default / 10, (kept, default)


def test_switch_and_bad_value(monkeypatch):
    monkeypatch.setenv(memory.ENV, "0")
    assert memory.keep_freed_memory() is False
    monkeypatch.setenv(memory.ENV, "yes")
    with pytest.raises(ValueError, match="MATNET_KEEP_FREED_MEMORY must be 0 or 1, got 'yes'"):
        memory.keep_freed_memory()


def test_cli_applies_it_and_reports_a_bad_value(monkeypatch, capsys, tmp_path):
    argv = ["sample", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "s.png")]
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or False)
    assert cli.main(argv) == 2  # the missing checkpoint: after the setting
    assert calls == [1]
    monkeypatch.undo()
    monkeypatch.setenv(memory.ENV, "2")
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == "matnet sample: error: MATNET_KEEP_FREED_MEMORY must be 0 or 1, got '2'"
