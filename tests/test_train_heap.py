"""The training loop keeps the step's big buffers mapped between steps (saevctl.train.heap): a block freed and
allocated again inside `kept()` does not page-fault again; outside it, glibc's defaults are back.

Measured in a fresh process, as `saevctl train` runs: in a long-lived one whose thread glibc has moved to a
secondary arena (after other threads contended for the main one), big blocks are mmapped whatever the settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saevctl.train import heap

CHILD = """
import json, resource, torch
from saevctl.train import heap
N = 20_000_000  # 80 MB of float32: above glibc's largest mmap threshold (32 MB)

def faults():
    torch.empty(N).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(N).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"pages": N * 4 // 4096, "before": faults()}
with heap.kept() as ok:
    out["ok"], out["inside"] = ok, faults()
out["after"] = faults()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_blocks_are_reused_inside_and_given_back_after() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    pages = out["pages"]
    assert out["before"] > pages // 2, out  # by default every big block is a fresh mapping
    assert out["ok"] and out["inside"] < pages // 20, out
    assert out["after"] > pages // 2, out


def test_disabled_is_a_no_op() -> None:
    with heap.kept(False) as ok:
        assert not ok
