"""One process of the multi-process runs in tests/test_multiprocess.py.

Launched N times by `examples/multihost_training.launch` (which appends
--process-id, --processes and --coordinator); uses the example's building
blocks (Trainer, process_local_batch, Orbax save/restore, to_torch_module) and
prints its results as one `RESULT {json}` line.

Scenarios:
  train   2 x 4: GPT-2 and a BatchNorm ConvNet, data parallel and FSDP, 5 steps;
          FSDP state saved at step 3; FSDP weights gathered back into torch.
  single  1 x 8: the single-device reference runs, and the step-3 checkpoints
          restored onto this 1-process, 8-device mesh and trained on.
  fault   2 x 4: the ConvNet with a checkpoint after every step; process 1 kills
          itself while step 4 is in flight (fault0: process 0, the coordinator).
  resume  2 x 4, fresh processes: the uninterrupted ConvNet run, the restart from
          the fault run's last checkpoint, and the same checkpoint on a (4, 2) mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "tests")]

import multihost_training as mh  # noqa: E402

STEPS = 5
SAVE_AT = 3  # the train scenario's checkpoint; the fault run dies in step SAVE_AT + 1
LR = 1e-2


@dataclass
class Task:
    module: Any  # the torch module
    params: dict
    buffers: dict
    loss: Callable  # (params, buffers, batch) -> (loss, new buffers)
    forward: Callable  # (params, buffers, batch) -> output
    torch_forward: Callable  # (module, host batch) -> torch output
    rows: Callable  # step -> rows(lo, hi) of that step's batch
    n: int  # global batch rows


def gpt2() -> Task:
    import models
    import numpy as np
    import optax
    import torch

    import bridge

    module, _ = models.build("gpt2")
    apply, params = bridge.torch_to_jax(module)

    def loss(params, buffers, ids):
        logits = apply(params, input_ids=ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean(), buffers

    def rows(step):  # the same sequences every step: the loss goes down as they are learnt
        return lambda lo, hi: np.stack(
            [np.random.default_rng(r).integers(0, models.VOCAB, models.T) for r in range(lo, hi)]
        ).astype(np.int32)

    return Task(
        module, params, {}, loss,
        forward=lambda p, b, ids: apply(p, input_ids=ids).logits,
        torch_forward=lambda m, ids: m(input_ids=torch.from_numpy(ids).long()).logits,
        rows=rows, n=8,
    )


def convnet() -> Task:
    import optax
    import torch

    import bridge

    module = mh.convnet()
    apply, params, buffers = bridge.torch_to_jax_with_state(module)

    def loss(params, buffers, batch):
        logits, buffers = apply(params, buffers, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), buffers

    return Task(
        module, params, buffers, loss,
        forward=lambda p, b, batch: apply(p, b, batch[0])[0],
        torch_forward=lambda m, batch: m(torch.from_numpy(batch[0])),
        rows=mh.images, n=mh.BATCH,
    )


def fsdp(axis: str | None = "data"):
    from jax.sharding import PartitionSpec as P

    # every parameter's first dimension over `axis`; None: replicated (data parallel)
    return [(r".", P(axis) if axis else P())]


def trainer(task: Task, mesh=None, rules=()):
    import optax

    return mh.Trainer(task.loss, task.params, task.buffers, optax.adam(LR), mesh, rules)


def batch(task: Task, step: int, mesh=None):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if mesh is None:
        return jax.device_put(task.rows(step)(0, task.n), jax.local_devices()[0])
    return mh.process_local_batch(task.rows(step), task.n, NamedSharding(mesh, P("data")))


def train(t, task: Task, steps, mesh=None, manager=None, save_every=0, die_in=None, dying=1) -> list[float]:
    import jax

    losses = []
    for step in steps:
        value = t.step(batch(task, step, mesh))
        if step + 1 == die_in and jax.process_index() == dying:
            print(f"process {dying} dies in step {step + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # the step is in flight on every process
        losses.append(float(value))
        print(f"step {step + 1} loss {losses[-1]:.6f}", flush=True)
        if save_every and (step + 1) % save_every == 0:
            mh.save(manager, step + 1, t.tree())
    return losses


def gathered(tree):
    import numpy as np
    from jax.experimental import multihost_utils

    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(tree, tiled=True).items()}


def max_diff(a: dict, b: dict) -> float:
    import numpy as np

    a, b = gathered(a), gathered(b)
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max((float(np.max(np.abs(a[k] - b[k]))) for k in a), default=0.0)


def torch_round_trip(task: Task, t, mesh) -> float:
    """Gather the sharded weights into the torch module; relative error of its output vs JAX's."""
    import jax
    import numpy as np
    import torch
    from jax.experimental import multihost_utils

    mh.to_torch_module(task.module, t.params, t.buffers)
    out = jax.jit(task.forward)(t.params, t.buffers, batch(task, 0, mesh))
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    with torch.no_grad():
        ref = task.torch_forward(task.module, task.rows(0)(0, task.n)).numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def scenario_train(ckpt: str) -> dict:
    out = {}
    for name, make in [("gpt2", gpt2), ("convnet", convnet)]:
        task, r = make(), {}
        mesh = mh.mesh()
        t = trainer(task, mesh, fsdp(None))
        r["dp"] = train(t, task, range(STEPS), mesh)
        r["dp_replicated"] = all(len(a.sharding.device_set) == 8 and a.sharding.is_fully_replicated
                                 for a in t.params.values())
        manager = mh.checkpoints(os.path.join(ckpt, name))
        t = trainer(task, mesh, fsdp())
        r["fsdp"] = train(t, task, range(STEPS), mesh, manager, save_every=SAVE_AT)
        manager.close()
        r["fsdp_shards"] = {k: [list(a.shape), list(a.addressable_shards[0].data.shape)]
                            for k, a in t.params.items()}
        mu = t.opt_state[0].mu  # optax.adam's first moment follows the params' sharding
        r["mu_shards_like_params"] = all(
            mu[k].addressable_shards[0].data.shape == a.addressable_shards[0].data.shape
            for k, a in t.params.items())
        r["torch_error"] = torch_round_trip(task, t, mesh)
        out[name] = r
    return out


def scenario_single(ckpt: str) -> dict:
    out = {}
    for name, make in [("gpt2", gpt2), ("convnet", convnet)]:
        task, r = make(), {}
        ref = trainer(task)
        r["single"] = train(ref, task, range(STEPS))
        mesh = mh.mesh()
        t = trainer(task, mesh, fsdp())
        manager = mh.checkpoints(os.path.join(ckpt, name))
        t.load(mh.restore(manager, SAVE_AT, t.tree()))
        manager.close()
        r["resumed"] = train(t, task, range(SAVE_AT, STEPS), mesh)
        r["buffers_diff"] = max_diff(t.buffers, ref.buffers)
        out[name] = r
    return out


def scenario_fault(ckpt: str, dying: int = 1) -> dict:
    task, mesh = convnet(), mh.mesh()
    manager = mh.checkpoints(os.path.join(ckpt, "fault" if dying == 1 else f"fault{dying}"))
    losses = train(trainer(task, mesh, fsdp()), task, range(STEPS), mesh, manager,
                   save_every=1, die_in=SAVE_AT + 1, dying=dying)
    return {"losses": losses}  # not reached: one process dies, the other is terminated


def scenario_fault0(ckpt: str) -> dict:
    return scenario_fault(ckpt, dying=0)  # process 0 hosts the coordination service


def scenario_resume(ckpt: str) -> dict:
    task, mesh = convnet(), mh.mesh()
    ref = trainer(task, mesh, fsdp())
    r = {"uninterrupted": train(ref, task, range(STEPS), mesh)}
    manager = mh.checkpoints(os.path.join(ckpt, "fault"))
    r["latest"] = last = manager.latest_step()
    t = trainer(task, mesh, fsdp())
    t.load(mh.restore(manager, last, t.tree()))
    r["restarted"] = train(t, task, range(last, STEPS), mesh)
    r["restarted_buffers_diff"] = max_diff(t.buffers, ref.buffers)
    mesh2 = mh.mesh((4, 2), ("data", "model"))
    t = trainer(task, mesh2, fsdp("model"))
    t.load(mh.restore(manager, last, t.tree()))
    manager.close()
    r["mesh2_shard"] = list(t.params["0.weight"].addressable_shards[0].data.shape)
    r["mesh2"] = train(t, task, range(last, STEPS), mesh2)
    r["mesh2_buffers_diff"] = max_diff(t.buffers, ref.buffers)
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["train", "single", "fault", "fault0", "resume"])
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    args = parser.parse_args()
    mh.initialize(args.coordinator, args.processes, args.process_id)
    import jax

    result = globals()[f"scenario_{args.scenario}"](args.checkpoint_dir)
    result["topology"] = [jax.process_count(), jax.local_device_count(), jax.device_count()]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
