"""Start one launch of real gloo processes on localhost for a test module and collect what they saved.

``launch(worker, world, scenarios, tmp_path)`` runs ``python worker RANK WORLD PORT OUTDIR SCENARIOS`` on
``world`` processes (a free port, one thread each), waits at most ``timeout`` seconds for all of them,
kills what is left (its own process group only) and returns each rank's saved dict, or fails the test
with the failing rank's error and the tail of its log."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, world, scenarios, tmp_path, timeout, env=None):
    """Run ``scenarios`` of ``worker`` (a file of this folder) on ``world`` processes (``env``: extra
    environment variables); each rank's output."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    procs, logs = [], []
    command = [sys.executable, os.path.join(HERE, worker)]
    try:
        for r in range(world):
            log = open(tmp_path / f"rank{r}.log", "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [*command, str(r), str(world), str(port), str(tmp_path), ",".join(scenarios)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # this launch's own process group only
                p.wait()
        for log in logs:
            log.close()
    outs, failed = [], []
    for r, p in enumerate(procs):
        path = tmp_path / f"rank{r}.pt"
        out = torch.load(path, weights_only=False) if path.exists() else None
        if out is None or "error" in out or p.returncode != 0:
            text = (tmp_path / f"rank{r}.log").read_text()[-4000:]
            why = out["error"] if out and "error" in out else f"exit code {p.returncode} (timeout {timeout} s?)"
            failed.append((r, why, text))
        outs.append(out)
    if failed:  # the rank that failed first, not those whose peer went away
        r, why, text = min(failed, key=lambda f: "Connection closed by peer" in f[1])
        pytest.fail(f"rank {r} of {world} failed: {why}\n--- log ---\n{text}")
    return outs


def run_worker(scenarios: dict) -> None:
    """The ``main`` of a worker: ``python worker.py RANK WORLD PORT OUTDIR SCENARIOS`` on a gloo group.
    Runs the comma-separated scenarios (``scenarios[name](rank, world, out)``; OUTDIR is ``sys.argv[4]``),
    saves ``out`` to OUTDIR/rank{RANK}.pt, and any exception with it (exit code 1)."""
    import traceback

    import torch.distributed as dist

    rank, world, port, outdir, names = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
    out = {"rank": rank, "world": world}
    code = 0
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name in names.split(","):
            scenarios[name](rank, world, out)
    except BaseException:
        out["error"] = traceback.format_exc()
        code = 1
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
    sys.exit(code)
