"""Multi-process training on JAX's distributed runtime (CPU, gloo collectives).

Each test launches local processes with `examples/multihost_training.launch`
(`jax.distributed.initialize` on localhost, 4 simulated CPU devices each); the
processes run tests/multiprocess_worker.py and print their results as JSON.
Every launch has a deadline and kills all its children on the way out.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import multihost_training as mh  # noqa: E402

WORKER = Path(__file__).with_name("multiprocess_worker.py")
STEPS, SAVE_AT = 5, 3  # as in the worker
#: A dead process must end the job within this many seconds (JAX's heartbeat
#: timeout, set by mh.initialize, plus the time to notice and abort).
FAULT_BOUND_S = 60


def _launch(scenario: str, ckpt: Path, processes: int, devices: int, timeout: float = 240):
    return mh.launch([scenario, "--checkpoint-dir", str(ckpt)], processes,
                     devices_per_process=devices, timeout=timeout, script=str(WORKER))


def _results(exits) -> dict:
    """The one result every process agrees on."""
    found = []
    for e in exits:
        assert e.returncode == 0, f"process {e.process_id} exited {e.returncode}:\n{e.stderr[-4000:]}"
        lines = [ln for ln in e.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, e.stdout[-2000:]
        found.append(json.loads(lines[-1][len("RESULT "):]))
    assert all(r == found[0] for r in found), "the processes disagree"
    return found[0]


def _same(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=0)


def test_train_on_two_processes_restore_on_one_and_back_to_torch(tmp_path):
    train = _results(_launch("train", tmp_path, 2, 4))
    single = _results(_launch("single", tmp_path, 1, 8))
    assert train["topology"] == [2, 4, 8] and single["topology"] == [1, 8, 8]
    for name in ("gpt2", "convnet"):
        t, s = train[name], single[name]
        reference = s["single"]  # one process, one device
        assert len(reference) == STEPS and reference[-1] < reference[0]
        _same(t["dp"], reference)
        _same(t["fsdp"], reference)
        assert t["dp_replicated"]
        # FSDP: every parameter's first dimension split 8 ways over the two processes
        for full, shard in t["fsdp_shards"].values():
            assert shard == [full[0] // 8, *full[1:]], (full, shard)
        assert t["mu_shards_like_params"]
        rel = max(abs(a - b) / abs(b) for a, b in zip(t["fsdp"] + t["dp"], reference * 2, strict=True))
        print(f"{name}: 2 x 4 losses vs one device, max relative difference {rel:.1e}; "
              f"torch vs JAX output {t['torch_error']:.1e}")
        # gathered into the torch module, the weights give JAX's output
        assert t["torch_error"] < 1e-5, t["torch_error"]
        # the 2-process checkpoint of step 3, restored onto 1 process x 8 devices
        _same(s["resumed"], reference[SAVE_AT:])
        assert s["buffers_diff"] < 1e-6  # BatchNorm statistics restored and updated alike


def _check_fault(exits, dying: int, error: str) -> None:
    dead, survivor = exits[dying], exits[1 - dying]
    assert f"process {dying} dies in step 4" in dead.stdout, dead.stdout + dead.stderr[-2000:]
    assert dead.returncode == -signal.SIGKILL
    # the survivor was stuck in the step's collectives: JAX's coordination service
    # ends it (not the launcher's deadline: returncode None) with a clear error
    assert survivor.returncode not in (0, None), survivor.returncode
    waited = survivor.seconds - dead.seconds
    assert 0 <= waited <= FAULT_BOUND_S, waited
    assert "Terminating process because the JAX distributed service detected fatal errors" in survivor.stderr
    assert re.search(error, survivor.stderr), survivor.stderr[-3000:]
    print(f"process {dying} killed; process {1 - dying} terminated {waited:.1f} s later "
          f"(bound {FAULT_BOUND_S} s)")


def test_dead_process_ends_the_job_and_a_restart_resumes_exactly(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    # both cases at once: most of their time is waiting for the heartbeat timeout
    with ThreadPoolExecutor(2) as pool:
        killed1 = pool.submit(_launch, "fault", tmp_path, 2, 4, timeout=180)
        killed0 = pool.submit(_launch, "fault0", tmp_path, 2, 4, timeout=180)
        killed1, killed0 = killed1.result(), killed0.result()
    # process 1 dead: the service misses its heartbeats ("Task 1 heartbeat timeout"
    # or "tasks are unhealthy (stopped sending heartbeats): 1")
    _check_fault(killed1, 1, r"heartbeat")
    # process 0 dead, and the coordination service with it
    _check_fault(killed0, 0, r"Failed to send RPC to coordination service")
    before = [float(v) for v in re.findall(r"step \d loss ([\d.]+)", killed1[0].stdout)]
    assert len(before) == SAVE_AT

    r = _results(_launch("resume", tmp_path, 2, 4))
    assert r["latest"] == SAVE_AT  # the last checkpoint the dead run committed
    _same(before, np.round(r["uninterrupted"][:SAVE_AT], 6))
    _same(r["restarted"], r["uninterrupted"][SAVE_AT:])
    assert r["restarted_buffers_diff"] < 1e-6
    # the same checkpoint on a (4, 2) mesh: params split 2 ways on "model" instead of 8
    assert r["mesh2_shard"] == [4, 3, 3, 3]
    _same(r["mesh2"], r["uninterrupted"][SAVE_AT:])
    assert r["mesh2_buffers_diff"] < 1e-6


def test_example_trains_and_prints_the_cluster_setup(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multihost_training.py"), "--processes", "2",
         "--steps", "4", "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-4000:]
    assert "2 processes x 4 devices = 8 cpu devices" in out
    assert "sharded as P('data',)" in out and "step 4 loss" in out
    assert "torch module with the trained weights vs JAX" in out
    assert "jax.distributed.initialize() with no arguments" in out  # how to run it on a real job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]  # its Orbax checkpoints
