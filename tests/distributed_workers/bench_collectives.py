"""Measured figures of spec/distributed.md: gloo on localhost, R processes (not a test).

    python tests/distributed_workers/bench_collectives.py 2      # or 3

Rank 0 prints the median wall time of: an all_reduce of k float64 (the latency term α and the
bandwidth term β of the cost model), the FAdam-style grouped all_reduce vs one per tensor, the
distributed iEF direction vs all-gathering G and solving on one rank."""

import os
import socket
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def timeit(fn, repeat):
    import torch.distributed as dist

    fn()
    out = []
    for _ in range(repeat):
        dist.barrier()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def worker(rank, world, port):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from fisheropt import fisher
    from fisheropt.torch import distributed as fd

    rows = []

    def report(what, seconds, nbytes=None):
        if rank == 0:
            extra = f"  {nbytes / seconds / 1e9:.2f} GB/s" if nbytes else ""
            rows.append(f"| {what} | {seconds * 1e3:.3f} ms |{extra}")

    for k in (1, 3 * 100, 768, 4096, 1 << 20):
        buf = torch.zeros(k, dtype=torch.float64)
        report(
            f"all_reduce {k} float64 ({k * 8} B)",
            timeit(lambda buf=buf: dist.all_reduce(buf), 30 if k < 1e5 else 5),
            k * 8 if k >= 1 << 20 else None,
        )
    bufs = [torch.zeros(3, dtype=torch.float64) for _ in range(100)]
    report(
        "100 tensors × all_reduce of 3 scalars (one per tensor)", timeit(lambda: [dist.all_reduce(b) for b in bufs], 5)
    )
    # distributed iEF vs all-gather of G
    Nr, P = 32 // world, 1 << 18
    N = Nr * world
    G = torch.randn(Nr, P, dtype=torch.float32, generator=torch.Generator().manual_seed(rank))
    s = torch.rand(Nr, dtype=torch.float64) + 0.1
    st = {}
    t_dist = timeit(lambda: fd.ngd_direction("ief", G=G, s=s, damping=1.0, stats=st), 5)
    report(f"distributed iEF, N={N}, P={P} float32 (all_to_all + all_reduce + solve + slice)", t_dist)
    cols = fd.column_split(P, world)
    out = torch.empty(N * cols[rank], dtype=torch.float32)
    report(
        f"  its all_to_all_single alone ({Nr * (P - cols[rank]) * 4 / 1e6:.1f} MB sent per rank)",
        timeit(
            lambda: dist.all_to_all_single(
                out,
                torch.cat([G[:, sum(cols[:j]) : sum(cols[: j + 1])].reshape(-1) for j in range(world)]),
                [Nr * cols[rank]] * world,
                [Nr * c for c in cols],
            ),
            5,
        ),
    )
    gathered = torch.empty(world * Nr * P, dtype=torch.float32)

    def gather_and_solve():
        dist.all_gather_into_tensor(gathered, G.reshape(-1))
        Gf = gathered.reshape(N, P).numpy()
        sf = torch.cat([s] * world).numpy()
        return fisher.ngd_direction("ief", G=Gf, s=sf, damping=1.0)

    report(
        f"all-gather G ({(world - 1) * Nr * P * 4 / 1e6:.1f} MB received per rank) + replicated solve",
        timeit(gather_and_solve, 5),
    )
    report("  its all_gather alone", timeit(lambda: dist.all_gather_into_tensor(gathered, G.reshape(-1)), 5))
    if rank == 0:
        print(f"gloo localhost, R={world}, torch {torch.__version__}")
        print("\n".join(rows))
        print("stats of the distributed iEF call:", st)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(world, port), nprocs=world)
