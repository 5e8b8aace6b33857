"""Regenerate docs/models.md: torchvision, timm and torch.nn models through the bridge.

    .venv-models/bin/python tools/models.py                  # every case (make models; about an hour)
    .venv-models/bin/python tools/models.py -k resnet        # the cases whose name contains "resnet"
    .venv-models/bin/python tools/models.py --results r.jsonl --write-only   # rewrite from earlier results

Each case runs in its own subprocess (`--one NAME`), with a time limit, and
appends one JSON line to the results file; the table is written from those
lines. The check itself is tests/model_zoo.py (`check`). The environment is
.venv-models (`make venv-models`): the main environment plus torchvision
and timm, which must stay out of .venv (see tests/model_zoo.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DOC = ROOT / "docs" / "models.md"


def _cases():
    import model_zoo

    return model_zoo.all_cases()


def run_one(name: str, out: Path) -> None:
    import traceback

    import model_zoo

    case = model_zoo.find_case(name)
    try:
        record = model_zoo.check(case)
    except Exception as e:  # recorded, not raised: the table lists it
        record = {"name": case.name, "family": case.family, "status": f"ERROR: {type(e).__name__}: {e}"[:400],
                  "traceback": traceback.format_exc()[-3000:]}
    record["commit"] = _commit()
    with out.open("a") as f:  # one short line, appended at once: safe beside other cases
        f.write(json.dumps(record) + "\n")


def _commit() -> str:
    """The checkout's commit, with "+" if the bridge's code differs from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "bridge", "adapters"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return ""
    return head + ("+" if dirty else "")


def run_all(names: list[str], out: Path, timeout: float, jobs: int) -> None:
    """Run each case in its own process, `jobs` at a time, appending records to `out`.

    With `jobs` > 1 each case runs single-threaded, and two large cases at
    once can exhaust the memory (the kernel killed efficientnet_b4 in float64
    beside efficientnet_b5 on the reference machine; alone it passes): a case
    killed with SIGKILL runs again alone, multi-threaded, after the others.
    """
    from concurrent.futures import ThreadPoolExecutor

    base = dict(os.environ, JAX_PLATFORMS="cpu")
    parallel = dict(base, OMP_NUM_THREADS="1") if jobs > 1 else base
    lock = threading.Lock()
    done = iter(range(1, len(names) + 1))
    killed: list[str] = []

    def one(name: str, env: dict, retry_if_killed: bool) -> None:
        t0 = time.perf_counter()
        failure = None
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--results", str(out)],
                                  env=env, timeout=timeout, capture_output=True, text=True)
            if proc.returncode == -signal.SIGKILL and retry_if_killed:
                with lock:
                    killed.append(name)
                    print(f"[{name}] killed (out of memory?): runs again alone at the end", flush=True)
                return
            if proc.returncode != 0:
                failure = {"name": name, "status": f"ERROR: exit {proc.returncode}", "traceback": proc.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            failure = {"name": name, "status": f"ERROR: over the {timeout:.0f} s limit"}
        with lock:
            if failure:
                with out.open("a") as f:
                    f.write(json.dumps(failure) + "\n")
            print(f"[{next(done)}/{len(names)}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda name: one(name, parallel, jobs > 1), names))
    for name in killed:
        one(name, base, False)


def _fmt(x, spec=".1e"):
    if x is None:
        return ""
    if isinstance(x, float) and x == float("inf"):
        return "inf"
    return format(x, spec)


def write(results: Path, seconds: float | None) -> None:
    import jax
    import model_zoo
    import torch

    records = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        records[r["name"]] = r  # the last run of a case wins
    order = [c.name for c in _cases()]
    rows = [records[n] for n in order if n in records]
    passed = [r for r in rows if r["status"].startswith("pass")]
    translated = [r for r in passed if r.get("callbacks", 1) == 0]
    fallback = [r for r in rows if r.get("callbacks", 0) > 0]
    lines = [
        "# Models through the bridge",
        "",
        "Generated by `make models` (tools/models.py; the check is tests/model_zoo.py); do not edit.",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        + (f"; sweep wall time {seconds / 60:.0f} min" if seconds else ""),
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, jax {jax.__version__}, "
        f"torchvision {model_zoo.import_torchvision().__version__}, timm {__import__('timm').__version__}",
        "- Models: random init (no weights downloaded), eval mode, BatchNorm running statistics randomised; "
        "batch 2 (video: 1), 64x64 images unless the model fixes its input size.",
        "- Each model: `bridge.torch_to_jax`, then `jax.jit(jax.value_and_grad(loss))` with `loss` a fixed "
        "random projection of every output; gradients with respect to every parameter and the input, "
        "against torch eager and `torch.autograd`.",
        f"- **float64** (x64, `model.double()`): the largest difference relative to the tensor's largest "
        f"magnitude must be at most {model_zoo.F64_FORWARD:g} (outputs) and {model_zoo.F64_GRAD:g} "
        "(gradients; the worst parameter is named), or, in a chaotic net, "
        f"{model_zoo.COND_MARGIN:g} times how far torch's own float64 result moves when the input "
        f"moves by {model_zoo.COND_STEP:g} (relative; some random-init nets with randomised BatchNorm "
        "statistics move by 1e-6 and more). Where a gradient disagrees, a central finite "
        "difference of torch's float64 forward decides which side is right.",
        f"- **float32**: the bridge must be no farther from torch's float64 result than torch's own "
        f"float32 result is, times {model_zoo.F32_MARGIN:g}, plus {model_zoo.F32_FLOOR:g} of the "
        "tensor's norm (per tensor, in norms); the columns give the bridge's distance over that bound "
        "(at most 1 passes).",
        "- **callbacks**: `torch_call` equations in the traced program (0: fully translated).",
        "- **commit**: the commit each case ran at (`+`: with uncommitted changes); blank for results "
        "recorded before results named their commit.",
        "- The torchvision classification models are every one `torchvision.models.list_models` lists "
        "with at most 40M parameters. torchvision is imported with two op schemas defined first "
        "(`torchvision::nms`, `torchvision::qnms`), because PyPI's wheel is a CUDA build whose C ops "
        "do not load beside torch's CPU build; no model here calls them.",
        "",
        f"**{len(passed)} of {len(rows)} pass; {len(translated)} fully translated "
        f"({100 * len(translated) / max(len(rows), 1):.0f}%), {len(fallback)} with callbacks.**"
        + (f" {len(order) - len(rows)} of the {len(order)} cases have not run yet (listed at the end)."
           if len(rows) < len(order) else ""),
        "",
        "| model | commit | params (M) | status | callbacks | f64 forward | f64 grad (worst) | f32 fwd / bound "
        "| f32 grad / bound | s |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        worst = f"{_fmt(r.get('f64_grad'))} ({r['f64_worst']})" if r.get("f64_worst") else _fmt(r.get("f64_grad"))
        lines.append(
            f"| {r['name']} | {r.get('commit', '')} | {r.get('params_m', '')} | {r['status'].replace('|', '/')} | {r.get('callbacks', '')} "
            f"| {_fmt(r.get('f64_forward'))} | {worst} | {_fmt(r.get('f32_forward_ratio'), '.2f')} "
            f"| {_fmt(r.get('f32_grad_ratio'), '.2f')} | {r.get('seconds', '')} |"
        )
    if fallback:
        lines += ["", "## Models that use callbacks", ""]
        for r in fallback:
            lines.append(f"- **{r['name']}**: {r.get('callbacks')} callback(s). "
                         + (r.get("fallback", "").replace("\n", " ")[:600] or "ops without a lowering"))
    loose = [r for r in rows if r.get("f64_grad") and 1e-12 < r["f64_grad"] <= model_zoo.F64_GRAD]
    if loose:
        lines += ["", "## float64 gradients that pass but differ by more than 1e-12", "",
                  "A relative difference near 3e-8 is float32's rounding of 1/6: torch's CPU "
                  "hardsigmoid backward multiplies by `1.0f / 6.0f` in every dtype, so torch's "
                  "float64 gradient is the inexact side "
                  "(`tests/test_ops_regressions.py::test_hardsigmoid_float64_gradient_is_exact_where_torchs_uses_float32_one_sixth`).",
                  ""]
        for r in loose:
            lines.append(f"- {r['name']}: {r['f64_grad']:.2e} (`{r['f64_worst']}`)")
    islands = [r for r in rows if r.get("float32_islands")]
    if islands:
        lines += ["", "## Models that compute parts in float32 in float64 mode", "",
                  "torch's float64 forward computes these ops in float32 here (the model casts to "
                  "float32 or creates float32 values itself), so those parts carry float32 rounding "
                  "on both sides; their float64 check uses "
                  f"tests/numerics.py's island tolerance ({model_zoo.GRAD64_ISLAND_RTOL:g}).", ""]
        for r in islands:
            lines.append(f"- {r['name']}: {', '.join(r['float32_islands'])}")
    fds = [r for r in rows if r.get("fd")]
    if fds:
        lines += ["", "## float64 gradient disagreements, decided by finite differences", ""]
        for r in fds:
            fd = r["fd"]
            lines.append(f"- {r['name']}: `{fd['param']}`[{fd['index']}]: finite difference "
                         f"{fd['finite_difference']:.10g}, bridge {fd['bridge']:.10g}, torch autograd {fd['torch']:.10g}")
    missing = [n for n in order if n not in records]
    if missing:
        lines += ["", "## Not run yet", "", ", ".join(missing)]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}: {len(passed)}/{len(rows)} pass, {len(translated)} fully translated")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("-k", default="", help="only the cases whose name contains this")
    ap.add_argument("--results", type=Path, default=ROOT / "build" / "models.jsonl")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per case")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the results file; skip the cases it has without an error")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at a time (each single-threaded when > 1)")
    a = ap.parse_args()
    if a.one:
        run_one(a.one, a.results)
        return
    names = [c.name for c in _cases() if a.k in c.name]
    if a.list:
        print("\n".join(names))
        print(len(names), "cases")
        return
    t0 = time.perf_counter()
    if not a.write_only:
        a.results.parent.mkdir(parents=True, exist_ok=True)
        if a.resume and a.results.exists():
            records = [json.loads(line) for line in a.results.read_text().splitlines()]
            done = {r["name"] for r in records if not r["status"].startswith("ERROR")}  # errors run again
            names = [n for n in names if n not in done]
        elif not a.k and a.results.exists():
            a.results.unlink()
        run_all(names, a.results, a.timeout, a.jobs)
    write(a.results, None if a.write_only else time.perf_counter() - t0)


if __name__ == "__main__":
    main()
