"""Data-parallel scoring: time with 1 vs P processes, and the bytes each route communicates.

    python benchmarks/bench_distributed.py [--procs 2] [--repeats 3] [--quick] [--skip-vitb]
                                           [--gpu-tflops 30] [--nvlink-gbs 200] [--ib-gbs 40] [--latency-us 30]

1. **Time, 1 vs P processes, same total data.** A ResidualMLP of width 256 (3 points, m = 257),
   8192 samples in batches of 512, scored by one process and by P processes (gloo on this
   machine's CPUs, one thread each, every rank streaming its 1/P of the batches), for the dense
   and the matrix-free route. Each time is the median over ``--repeats`` of the slowest rank's
   wall time (a barrier before and after each call); the ratio is the speed-up. The busiest
   rank's CPU time is reported too: on a machine whose cores are busy with other work the wall
   times cannot show a speed-up, the CPU times can. Then the step-wise Python Lanczos (the
   distributed matrix-free driver) against the C++ one on the same rows, in one process.
2. **Bytes per scoring step at ViT-B width**: one ``tokens`` site of a ViT with embed_dim 768
   (n = 768 units, m = 769), scored on 2 ranks. Computed: dense = one all-reduce of the blocks,
   ``n m^2`` floats per point; matrix-free = one all-reduce of ``n_active x m`` floats per
   Lanczos step, plus the warm start (the ``m x m`` Gram matrix and the ``n x 32 x 32`` projected
   blocks). Measured: the payload counted by :func:`topoderiv.method.distributed.comm_counters`
   in a real 2-rank run (a ring all-reduce moves ``2 (P - 1) / P`` times the payload per rank).
3. **Which route wins at 8 and 64 GPUs**: a model of one scoring step per point, compute / P
   (the cost model of :func:`topoderiv.ops.choose_route` at ``--gpu-tflops``) + the solve every
   rank repeats + ring all-reduce time (payload ``2 (P - 1) / P / bandwidth`` + ``2 (P - 1)``
   latencies per collective) with NVLink bandwidth inside a node of 8 and InfiniBand across nodes.
   The assumptions are printed; the numbers are a model, not a measurement.

``--quick`` shrinks every size (a smoke run); ``--skip-vitb`` skips the 2-rank ViT-B run (the
dense route holds 1.8 GB of blocks per rank).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import machine, table  # noqa: E402

STEPS_ASSUMED = 12  # Lanczos steps per point the cost model of topoderiv.ops.choose_route assumes
WARM_RANK = 32


# ------------------------------------------------------------------------------------------------
# workers


def _mlp_problem(quick: bool):
    from topoderiv.models import ResidualMLP

    width, n, bs = (32, 1024, 128) if quick else (256, 8192, 512)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResidualMLP(16, width, 1, 2)
    x = torch.rand(n, 16, generator=g) * 2 - 1
    y = (torch.sin(3 * x[:, :4]).sum(1) * torch.cos(2 * x[:, 4:8]).sum(1))[:, None] / 4
    batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    return model, batches, f"ResidualMLP width {width}, {n} samples, batches of {bs}"


def _vit_problem(quick: bool, per_rank: int):
    from topoderiv.models import ViT

    dim, heads = (64, 2) if quick else (768, 12)
    torch.manual_seed(0)
    model = ViT(img_size=32, patch_size=16, in_chans=3, num_classes=10, embed_dim=dim, depth=1, num_heads=heads,
                insert="tokens")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(per_rank, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (per_rank,), generator=g)
    return model, [(x, y)], dim


def _time_job(rank, world, args):
    import topoderiv as td

    quick, repeats, route = args
    model, batches, _ = _mlp_problem(quick)
    mine = batches[rank::world]
    td.score(model, mine, F.mse_loss, route=route)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        rep = td.score(model, mine, F.mse_loss, route=route)
        c1 = time.process_time()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - t0)
        cpu.append(c1 - c0)
    return {"time": statistics.median(times), "cpu": statistics.median(cpu), "route": rep.points[0].route,
            "points": len(rep.points), "mu": [p.mu for p in rep.points]}


def _stepwise_job(rank, world, args):
    """One process: the C++ matrix-free Lanczos vs the step-wise Python one on the same rows."""
    from topoderiv import ops
    from topoderiv.method.lanczos import sensitivity_lanczos
    from topoderiv.method.statistic import subspace_start
    from topoderiv.sites.capture import capture_all

    quick, repeats = args
    model, batches, _ = _mlp_problem(quick)
    cap = capture_all(model, batches, F.mse_loss)
    u, q = cap.states[1], cap.costates[1]
    v0 = subspace_start(u, q, True)
    out = {}
    for name, f in (("C++", lambda: ops.sensitivity_topk(u, q, route="matfree", tol=1e-3, v0=v0)),
                    ("step-wise", lambda: sensitivity_lanczos(u, q, None, tol=1e-3, v0=v0))):
        f()
        ts = []
        for _ in range(repeats):
            c0 = time.process_time()
            res = f()
            ts.append(time.process_time() - c0)
        out[name] = (statistics.median(ts), float(res.values.max()))
    return out


def _bytes_job(rank, world, args):
    import topoderiv as td
    from topoderiv.method.distributed import comm_counters, reset_comm_counters

    quick, route = args
    model, data, dim = _vit_problem(quick, 4)
    reset_comm_counters()
    t0 = time.perf_counter()
    rep = td.score(model, data, F.cross_entropy, points=[0], route=route, rule="top")
    wall = time.perf_counter() - t0
    return {"counters": comm_counters(), "route": rep.points[0].route, "mu": rep.points[0].mu, "wall": wall,
            "dim": dim}


JOBS = {"time": _time_job, "bytes": _bytes_job, "stepwise": _stepwise_job}


def _worker(rank, world, init, out, job, args):
    torch.set_num_threads(1)
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=600))
        torch.save(JOBS[job](rank, world, args), Path(out) / f"{rank}.pt")
    except BaseException:  # noqa: BLE001
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_job(job: str, world: int, args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = torch.multiprocessing.get_context("spawn")
        init = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world, init, tmp, job, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        errs = [(Path(tmp) / f"{r}.err") for r in range(world) if (Path(tmp) / f"{r}.err").exists()]
        if errs:
            raise RuntimeError(f"job {job} failed:\n" + "\n".join(e.read_text() for e in errs))
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------------------
# the model of 8 and 64 GPUs


def computed_bytes(n: int, m: int, steps: int, warm: bool) -> dict:
    """Payload bytes (float32) of one point's scoring: dense and matrix-free."""
    dense = n * m * m * 4
    per_step = n * m * 4
    warm_b = (m * m + n * WARM_RANK * WARM_RANK) * 4 if warm else 0
    return {"dense": dense, "matfree_per_step": per_step, "matfree": steps * per_step + warm_b, "warm": warm_b}


def allreduce_time(payload: float, P: int, gbs: float, latency_us: float, collectives: int) -> float:
    """Seconds of ``collectives`` all-reduces moving ``payload`` bytes in total: the ring's bandwidth
    term ``2 (P - 1) / P * payload / bandwidth`` plus a tree's latency ``2 log2(P)`` hops per
    collective (what NCCL does for small messages)."""
    if P <= 1:
        return 0.0
    return 2 * (P - 1) / P * payload / (gbs * 1e9) + collectives * 2 * math.ceil(math.log2(P)) * latency_us * 1e-6


def gpu_model(n: int, m: int, rows: int, P: int, args) -> dict:
    """Seconds per point of one scoring step at P GPUs (8 per node: NVLink inside, IB across)."""
    steps = STEPS_ASSUMED
    flops = args.gpu_tflops * 1e12
    dense_build = 2 * rows * n * m * (m + 1) / 2 / P / flops  # every rank its rows
    dense_solve = 2 * steps * n * m * m / flops  # every rank solves all blocks
    matfree = 2 * 2 * steps * rows * n * m / P / flops  # two GEMM passes per step, rows split
    gbs = args.nvlink_gbs if P <= 8 else args.ib_gbs
    b = computed_bytes(n, m, steps, True)
    c_dense = allreduce_time(b["dense"], P, gbs, args.latency_us, 1)
    c_mf = allreduce_time(b["matfree"], P, gbs, args.latency_us, steps + 2)
    t_dense, t_mf = dense_build + dense_solve + c_dense, matfree + c_mf
    return {"GPUs": P, "link": "NVLink" if P <= 8 else "IB", "dense compute s": dense_build + dense_solve,
            "dense comm s": c_dense, "matfree compute s": matfree, "matfree comm s": c_mf, "dense s": t_dense,
            "matfree s": t_mf, "wins": "matfree" if t_mf < t_dense else "dense"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2, help="processes of the data-parallel run (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--skip-vitb", action="store_true", help="skip the measured 2-rank ViT-B run")
    ap.add_argument("--gpu-tflops", type=float, default=30.0, help="fp32 rate the model assumes per GPU")
    ap.add_argument("--nvlink-gbs", type=float, default=200.0, help="all-reduce bus bandwidth in a node, GB/s")
    ap.add_argument("--ib-gbs", type=float, default=40.0, help="all-reduce bus bandwidth across nodes, GB/s")
    ap.add_argument("--latency-us", type=float, default=30.0, help="latency per ring hop, microseconds")
    ap.add_argument("--rows", type=int, default=256 * 197, help="rows per point in the model (samples x tokens)")
    args = ap.parse_args(argv)

    print(f"# data-parallel scoring on {machine()} (gloo, 1 thread per process)\n")
    _, _, desc = _mlp_problem(args.quick)
    rows = []
    for route in ("dense", "matfree"):
        one = run_job("time", 1, (args.quick, args.repeats, route))[0]
        many = run_job("time", args.procs, (args.quick, args.repeats, route))
        t_many = max(r["time"] for r in many)
        c_many = max(r["cpu"] for r in many)
        same = all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(many[0]["mu"], one["mu"]))
        rows.append({"route": one["route"], "1 process s": one["time"], f"{args.procs} processes s": t_many,
                     "speed-up": one["time"] / t_many, "1 process cpu s": one["cpu"],
                     "busiest rank cpu s": c_many, "cpu speed-up": one["cpu"] / c_many, "same mu": same})
    print(f"## 1. time to score {desc}, 1 vs {args.procs} processes\n")
    print(table(rows, ["route", "1 process s", f"{args.procs} processes s", "speed-up", "1 process cpu s",
                       "busiest rank cpu s", "cpu speed-up", "same mu"]))
    print("\nwall times are the slowest rank's (barriers around each call); cpu: the busiest rank's process time "
          "(what the speed-up is on an idle machine with a core per rank; a busy machine shows in the wall times)")
    sw = run_job("stepwise", 1, (args.quick, args.repeats))[0]
    print(f"\nthe step-wise Python Lanczos (distributed route) vs the C++ one, one process, the same rows of one "
          f"point: C++ {sw['C++'][0]:.3g} s cpu, step-wise {sw['step-wise'][0]:.3g} s cpu (x"
          f"{sw['step-wise'][0] / sw['C++'][0]:.2f}); top eigenvalues {sw['C++'][1]:.6g} and {sw['step-wise'][1]:.6g}")

    n = m = None
    if not args.skip_vitb:
        res = {}
        for route in ("dense", "matfree"):
            out = run_job("bytes", 2, (args.quick, route))
            res[route] = out[0]
        dim = res["dense"]["dim"]
        n, m = dim, dim + 1
        c_mf = res["matfree"]["counters"]
        steps = c_mf.get("matvec", (0, 0))[0]
        comp = computed_bytes(n, m, steps, m >= 2 * WARM_RANK)
        print(f"\n## 2. bytes per scoring step, ViT width {dim} tokens site (n = {n}, m = {m}), 2 ranks, one point\n")
        brows = []
        for route in ("dense", "matfree"):
            cnt = res[route]["counters"]
            payload = sum(b for tag, (_, b) in cnt.items())
            calls = sum(c for tag, (c, _) in cnt.items())
            brows.append({"route": route, "computed MB": comp[route] / 2**20, "measured MB": payload / 2**20,
                          "collectives": calls, "per tag": ", ".join(f"{t} {c}x {b / 2**20:.3g} MB"
                                                                     for t, (c, b) in sorted(cnt.items())),
                          "wall s": res[route]["wall"]})
        print(table(brows, ["route", "computed MB", "measured MB", "collectives", "per tag", "wall s"]))
        print(f"\ncomputed: dense n m^2 floats; matrix-free with every block active at each of the measured steps "
              f"(an upper bound: converged blocks stop communicating). Matrix-free: {steps} Lanczos steps (one all-reduce of n_active x m floats each, at most "
              f"{comp['matfree_per_step'] / 2**20:.3g} MB), warm start {comp['warm'] / 2**20:.3g} MB; a ring all-reduce "
              f"moves 2 (P - 1) / P times the payload per rank")
    n_b, m_b = 768, 769
    print(f"\n## 3. model: one point of a ViT-B tokens site (n = {n_b}, m = {m_b}), {args.rows} rows, "
          f"{STEPS_ASSUMED} Lanczos steps\n")
    print(f"assumed: {args.gpu_tflops} TFLOP/s per GPU (fp32 GEMM-like kernels), ring all-reduce at "
          f"{args.nvlink_gbs} GB/s inside a node of 8 (NVLink) and {args.ib_gbs} GB/s across nodes (IB), "
          f"{args.latency_us} us per hop (2 log2 P hops per collective); the dense solve (Lanczos on the n m^2 "
          f"blocks) runs on every rank\n")
    mrows = [gpu_model(n_b, m_b, args.rows, P, args) for P in (1, 8, 64)]
    print(table(mrows, ["GPUs", "link", "dense compute s", "dense comm s", "dense s", "matfree compute s",
                        "matfree comm s", "matfree s", "wins"]))


if __name__ == "__main__":
    main()
