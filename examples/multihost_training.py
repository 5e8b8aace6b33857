"""Multi-process training of a translated torch model on JAX's distributed runtime.

One process per host, as on a TPU pod or a GPU cluster: every process runs this
same script, `jax.distributed.initialize` joins them into one JAX program over
all their devices, parameters are sharded FSDP-style over the global mesh with
`bridge.shard_params`, each process feeds only its own rows of the batch
(`jax.make_array_from_process_local_data`), Orbax writes and reads checkpoints
from every process, and at the end the trained weights go back into the torch
module.

    python examples/multihost_training.py --processes 2     # 2 local processes x 4 CPU devices

The model is a small ConvNet with BatchNorm in train mode, translated with
`bridge.torch_to_jax_with_state` (its running statistics are state, checkpointed
with the parameters and the optimizer state). A second run with the same
--checkpoint-dir resumes from the last checkpoint.

Locally the launcher (`launch`) starts the N processes itself, each with
XLA_FLAGS=--xla_force_host_platform_device_count=4, JAX_PLATFORMS=cpu and
JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo, and gives each one `--process-id`. On a real multi-host job only `initialize`
changes (see `REAL_CLUSTER`, printed by the launcher): the training code is the
same. docs/distributed.md explains each step.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REAL_CLUSTER = """\
On a real multi-host job, run this script once per host instead of the launcher:
  Cloud TPU pod slice, or GPUs under Slurm (srun) or Open MPI (mpirun):
      python multihost_training.py --process-id auto --checkpoint-dir gs://BUCKET/run
      -> jax.distributed.initialize() with no arguments: the coordinator, process count
         and id come from the TPU metadata server or the SLURM_* / OMPI_* variables
         (GPUs: one process per GPU by default). On TPU VMs, start it on every worker:
         gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python multihost_training.py ..."
  Anything else (plain ssh, Kubernetes without the kubernetes package), on host I of N:
      python multihost_training.py --coordinator HOST0:PORT --processes N --process-id I ...
      -> jax.distributed.initialize(coordinator_address="HOST0:PORT", num_processes=N,
         process_id=I); JAX_COORDINATOR_ADDRESS may stand for coordinator_address.
  Only this local simulation needs XLA_FLAGS=--xla_force_host_platform_device_count,
  JAX_PLATFORMS=cpu and the CPU collectives (gloo): TPUs and GPUs use their interconnect.
  --checkpoint-dir must be storage every host sees (a gs:// bucket, NFS)."""

#: Seconds without a heartbeat after which the coordination service declares a
#: process dead and terminates the others (JAX's default is 100).
HEARTBEAT_TIMEOUT_S = 10
DEVICES_PER_PROCESS = 4
BATCH = 16  # global batch rows, split over every process's devices
CLASSES = 8


@dataclass
class Exit:
    """How one launched process ended."""

    process_id: int
    returncode: int | None  # None: killed by the launcher's deadline
    stdout: str
    stderr: str
    seconds: float  # from the launch to its exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(
    argv: list[str],
    processes: int,
    *,
    devices_per_process: int = DEVICES_PER_PROCESS,
    timeout: float = 300,
    script: str | None = None,
    env: dict[str, str] | None = None,
) -> list[Exit]:
    """Run `script argv --process-id i --processes N --coordinator localhost:PORT` N times.

    Each process gets its own simulated CPU devices. Returns when every process
    has exited; past `timeout` seconds the ones still running are killed (their
    `returncode` is None). No child outlives this call.
    """
    coordinator = f"localhost:{free_port()}"
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # cross-process collectives on the CPU
        PYTHONUNBUFFERED="1",
        **(env or {}),
    )
    start = time.monotonic()
    procs, logs, ended = [], [], {}
    try:
        for i in range(processes):
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            logs.append((out, err))
            cmd = [sys.executable, script or __file__, *argv, "--process-id", str(i),
                   "--processes", str(processes), "--coordinator", coordinator]
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=base, text=True))
        while len(ended) < processes and time.monotonic() - start < timeout:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - start
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    exits = []
    for i, (p, (out, err)) in enumerate(zip(procs, logs, strict=True)):
        out.seek(0)
        err.seek(0)
        exits.append(Exit(i, p.returncode if i in ended else None, out.read(), err.read(),
                          ended.get(i, time.monotonic() - start)))
        out.close()
        err.close()
    return exits


def initialize(coordinator: str, processes: int, process_id: int) -> None:
    """Join the JAX distributed runtime, with bounded timeouts (a dead peer ends the job)."""
    import jax

    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=30,
    )


def mesh(shape: tuple[int, ...] = (), axes: tuple[str, ...] = ("data",)):
    """A mesh over every process's devices (default: all of them on one `data` axis)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = np.array(jax.devices())
    return Mesh(devices.reshape(shape or (devices.size,)), axes)


def process_local_batch(rows, global_rows: int, sharding):
    """The global batch as jax.Arrays, made from this process's rows only.

    `rows(lo, hi)` returns rows lo..hi-1 of the global batch (a data loader that
    reads only them), as an array or a tuple of arrays; lo and hi are where
    this process's devices sit on the sharding's first dimension.
    """
    import jax

    index = sharding.addressable_devices_indices_map((global_rows,)).values()
    lo = min(i[0].start or 0 for i in index)
    hi = max(global_rows if i[0].stop is None else i[0].stop for i in index)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, a, (global_rows, *a.shape[1:])),
        rows(lo, hi),
    )


def convnet():
    """A small ConvNet with BatchNorm, in train mode (running statistics update)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),  # BatchNorm follows: no bias
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, CLASSES),
    ).train()


def images(step: int):
    """rows(lo, hi) of step `step`'s batch: each row from its own seed, so a process makes only its rows.

    The label is the channel with the largest mean: learnable, so the loss goes down.
    """
    import numpy as np

    def rows(lo, hi):
        gens = [np.random.default_rng(1000 * step + r) for r in range(lo, hi)]
        x = np.stack([g.standard_normal((3, 8, 8), dtype=np.float32) for g in gens])
        return x, x.mean(axis=(2, 3)).argmax(axis=1).astype(np.int32)

    return rows


class Trainer:
    """Params, optimizer state and buffers of a translated model, and a jitted step.

    `loss(params, buffers, batch) -> (loss, new_buffers)`. With a mesh the
    params are sharded by `rules` (`bridge.shard_params`), the buffers and
    scalars replicated; without one everything sits on one device.
    """

    def __init__(self, loss, params, buffers, opt, mesh=None, rules=()):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        import bridge

        self.opt = opt
        if mesh is None:
            device = jax.local_devices()[0]
            put = lambda tree: jax.device_put(tree, device)  # noqa: E731
            self.params, self.buffers = put(params), put(buffers)
            self.opt_state = jax.jit(opt.init)(self.params)
            self.scalar = None
        else:
            self.params = bridge.shard_params(params, mesh, list(rules), default=None)
            self.buffers = bridge.shard_params(buffers, mesh, [])  # replicated
            self.scalar = NamedSharding(mesh, PartitionSpec())
            state_shardings = _optimizer_shardings(
                jax.eval_shape(opt.init, self.params),
                {k: v.sharding for k, v in self.params.items()}, self.scalar)
            self.opt_state = jax.jit(opt.init, out_shardings=state_shardings)(self.params)

        def step(params, opt_state, buffers, batch):
            (value, buffers), grads = jax.value_and_grad(loss, has_aux=True)(params, buffers, batch)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
            return params, opt_state, buffers, value

        trees = (self.params, self.opt_state, self.buffers)
        out = None if mesh is None else (*jax.tree.map(lambda a: a.sharding, trees), self.scalar)
        # No donate_argnums: on one device the params still share the torch module's memory.
        self._step = jax.jit(step, out_shardings=out)

    def step(self, batch):
        """One step; returns the loss as a jax.Array (dispatched, not waited for)."""
        self.params, self.opt_state, self.buffers, value = self._step(
            self.params, self.opt_state, self.buffers, batch)
        return value

    def tree(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state, "buffers": self.buffers}

    def load(self, tree: dict) -> None:
        self.params, self.opt_state, self.buffers = tree["params"], tree["opt_state"], tree["buffers"]


def _optimizer_shardings(abstract_state, param_shardings: dict, replicated):
    """Optimizer-state dicts keyed like the params (optax's mu, nu) follow the params'
    shardings; everything else (step counts) is replicated."""
    import jax

    def like_params(node):
        return isinstance(node, dict) and node.keys() == param_shardings.keys()

    return jax.tree.map(lambda n: dict(param_shardings) if like_params(n) else replicated,
                        abstract_state, is_leaf=like_params)


def checkpoints(directory: str):
    """An Orbax CheckpointManager over `directory` (every process passes the same path)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=3))


def save(manager, step: int, tree: dict) -> None:
    """Every process calls this; each writes its own shards, Orbax commits the step once."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()


def restore(manager, step: int, like: dict) -> dict:
    """Read step `step` onto the shardings of `like` (any mesh, any process count)."""
    import jax
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def to_torch_module(module, *trees) -> None:
    """Gather sharded params (and buffers) from every process and load them into `module`."""
    import jax
    from jax.experimental import multihost_utils

    import bridge

    state = {}
    for tree in trees:
        gathered = multihost_utils.process_allgather(tree, tiled=True)  # numpy, full arrays
        state.update(bridge.to_torch(jax.device_put(gathered, jax.local_devices()[0])))
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, unexpected


def worker(args) -> None:
    import jax
    import numpy as np
    import optax
    import torch
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bridge

    if args.coordinator != "auto":
        initialize(args.coordinator, args.processes, args.process_id)
    else:
        jax.distributed.initialize()  # TPU pod, Slurm, Open MPI: detected
    me = jax.process_index()
    say = (lambda *a: print(*a, flush=True)) if me == 0 else (lambda *a: None)
    say(f"{jax.process_count()} processes x {jax.local_device_count()} devices = "
        f"{jax.device_count()} {jax.devices()[0].platform} devices")

    model = convnet()
    apply, params, buffers = bridge.torch_to_jax_with_state(model)

    def loss(params, buffers, batch):
        x, y = batch
        logits, buffers = apply(params, buffers, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), buffers

    m = mesh()
    fsdp = [(r".", P("data"))]  # every parameter's first dimension over all devices
    trainer = Trainer(loss, params, buffers, optax.adam(1e-2), m, fsdp)
    say(f"FSDP: 0.weight {trainer.params['0.weight'].shape} sharded as "
        f"{trainer.params['0.weight'].sharding.spec}, "
        f"{trainer.params['0.weight'].addressable_shards[0].data.shape} per device")

    directory = args.checkpoint_dir or "multihost_checkpoints"
    if "://" not in directory:  # gs://... stays as it is
        directory = os.path.abspath(directory)
    manager = checkpoints(directory)
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        trainer.load(restore(manager, start, trainer.tree()))
        say(f"resumed from the checkpoint of step {start}")
    data = NamedSharding(m, P("data"))
    for step in range(start, args.steps):
        value = float(trainer.step(process_local_batch(images(step), BATCH, data)))
        say(f"step {step + 1} loss {value:.6f}")
        if (step + 1) % args.checkpoint_every == 0:
            save(manager, step + 1, trainer.tree())
    manager.close()

    # Back to torch: the trained weights and running statistics, gathered.
    to_torch_module(model, trainer.params, trainer.buffers)
    x, _ = process_local_batch(images(0), BATCH, data)
    out, _ = jax.jit(apply)(trainer.params, trainer.buffers, x)
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    with torch.no_grad():
        ref = model(torch.from_numpy(images(0)(0, BATCH)[0])).numpy()
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    say(f"torch module with the trained weights vs JAX: max relative error {err:.1e}")
    assert err < 1e-4, err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="local processes to launch")
    parser.add_argument("--process-id", help="set by the launcher ('auto': detect the cluster)")
    parser.add_argument("--coordinator", default="auto")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args(argv)
    if args.process_id is not None:
        args.process_id = None if args.process_id == "auto" else int(args.process_id)
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint_dir or tmp
        print(f"launching {args.processes} local processes x {DEVICES_PER_PROCESS} CPU devices; "
              f"checkpoints in {ckpt}", flush=True)
        exits = launch(["--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every),
                        "--checkpoint-dir", ckpt], args.processes, timeout=600)
    for e in exits:
        print("".join(ln for ln in e.stdout.splitlines(True) if not ln.startswith("[Gloo]")), end="")
    failed = [e for e in exits if e.returncode != 0]
    for e in failed:
        print(f"process {e.process_id} failed ({e.returncode}):\n{e.stderr[-3000:]}", file=sys.stderr)
    print()
    print(REAL_CLUSTER)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
