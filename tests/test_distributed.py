"""Data parallelism: scoring, the eps search, training and growth under torch.distributed (gloo, CPU).

Every distributed result is compared with one process on the concatenated data (computed here, in
the test process, from the same seeds), and the single-process results with float64 references:

- ``score`` on 2 ranks (uneven shards) and 3 ranks (one of them with an EMPTY shard): mu, r*, phi
  (up to sign), the loss and S equal the single-process report on the union of the shards, for the
  dense route, the matrix-free route (step-wise Lanczos, one all-reduce per step, warm-started),
  route ``"auto"``, a conv site (ResidualCNN), a token site (ViT(insert="tokens") and a
  ResidualMLP on [B, T, d]) and a transformer-block site (the singular statistic), in float32
  (round-off), bfloat16 (rows; float32 statistics) and float64 (against a float64 eigh of the
  dense blocks);
- the paths: a memory budget exceeded on ONE rank only makes every rank stream dense blocks (one
  block all-reduce per point, whatever the number of batches); a rank whose route decision is
  tampered with makes every rank raise (the route guard), as does a rank with NaN data;
- the step-wise Python Lanczos against the C++ op (same steps, same pairs);
- ``search_eps`` and ``evaluate`` equal their single-process values;
- growth: a 2-rank Grower (a plain model, and a DDP-wrapped one) makes the same insertions (point,
  eps) as one process with the same global batches, and ends with parameters equal on every rank
  (bit for bit) and to the single-process run (within round-off); a run resumed on 2 ranks from
  rank 0's checkpoint ends bit-identical to the uninterrupted 2-rank run;
- ``topoderiv grow --distributed 2`` (torchrun underneath) reproduces the single-process command.

Workers are spawned processes (``torch.multiprocessing`` spawn context, ``init_method=file://``);
each job runs several scenarios and the tests read their results, so the processes start once.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import topoderiv as td
from topoderiv import ops
from topoderiv.data import Shard, shard
from topoderiv.method import lanczos as steplanczos
from topoderiv.method.distributed import comm_counters, communicator, current_group, process_group, reset_comm_counters
from topoderiv.method.statistic import kernels_available
from topoderiv.models import ResidualCNN, ResidualMLP, ViT

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()
                                     and kernels_available()), reason="needs torch.distributed with gloo and _C")

JOB_TIMEOUT = 240  # seconds a job may take before its processes are killed (the test then fails)


# ------------------------------------------------------------------------------------------------
# problems (built identically in the workers and here)


def _batches(seed, sizes, shape, d_out, dtype=torch.float32, classes=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
        if classes is not None:
            y = torch.randint(0, classes, (n,), generator=g)
        else:
            z = x[..., :d_out]  # [n, d_out] or per token [n, T, d_out]
            y = torch.tanh(z * 2 + 0.3 * torch.randn(z.shape, generator=g, dtype=torch.float64)).to(dtype)
        out.append((x.to(dtype), y))
    return out


def _mlp(dtype=torch.float32):
    torch.manual_seed(3)
    return ResidualMLP(6, 80, 3, 2).to(dtype)  # m = 81 >= 64: matrix-free solves are warm-started


def _tokens_mlp():
    torch.manual_seed(4)
    return ResidualMLP(5, 24, 2, 2, feature="layernorm")  # on [B, T, d]: rows = samples x tokens


def _cnn():
    torch.manual_seed(5)
    return ResidualCNN(2, 3, (4,), (2,))


def _vit(insert):
    torch.manual_seed(6)
    return ViT(8, 4, 2, 3, 16, 2, 2, insert=insert)


SIZES = [40, 24, 56, 16]  # the global batches; shards: see _shards
PROBLEMS = {
    "mlp": lambda: (_mlp(), _batches(1, SIZES, (6,), 3), F.mse_loss),
    "mlp64": lambda: (_mlp(torch.float64), _batches(1, SIZES, (6,), 3, torch.float64), F.mse_loss),
    "mlp_bf16": lambda: (_mlp(torch.bfloat16), _batches(1, SIZES, (6,), 3, torch.bfloat16), F.mse_loss),
    "tokens_mlp": lambda: (_tokens_mlp(), _batches(2, [10, 6, 12, 4], (7, 5), 2), F.mse_loss),
    "cnn": lambda: (_cnn(), _batches(3, [10, 6, 12, 4], (2, 6, 6), 3, classes=3), F.cross_entropy),
    "vit_tokens": lambda: (_vit("tokens"), _batches(4, [10, 6, 12, 4], (2, 8, 8), 3, classes=3), F.cross_entropy),
    "vit_block": lambda: (_vit("transformer_block"), _batches(4, [10, 6, 12, 4], (2, 8, 8), 3, classes=3),
                          F.cross_entropy),
}
# (problem, score kwargs): every case is scored on the ranks and here
CASES = {
    "mlp_dense_all": ("mlp", dict(route="dense", rule="all")),
    "mlp_matfree_top": ("mlp", dict(route="matfree", rule="top")),
    "mlp_matfree_all_tight": ("mlp", dict(route="matfree", rule="all", tol=1e-6)),
    "mlp_auto_multi": ("mlp", dict(route="auto", rule="multi")),
    "mlp64_dense": ("mlp64", dict(route="dense", rule="all")),
    "mlp64_matfree": ("mlp64", dict(route="matfree", rule="all")),
    "mlp_bf16_dense": ("mlp_bf16", dict(route="dense", rule="all")),  # bfloat16 rows, float32 statistics
    "mlp_bf16_matfree": ("mlp_bf16", dict(route="matfree", rule="top")),
    "tokens_mlp_matfree": ("tokens_mlp", dict(route="matfree", rule="all")),
    "cnn_all": ("cnn", dict(rule="all")),
    "vit_tokens_auto": ("vit_tokens", dict(rule="all")),
    "vit_tokens_matfree": ("vit_tokens", dict(route="matfree", rule="top")),
    "vit_block_top": ("vit_block", dict(rule="top")),
    "vit_block_all": ("vit_block", dict(rule="all")),
}


def _shards(world, rank, batches):
    """2 ranks: [b0, b1, b2] and [b3]; 3 ranks: [b0, b1], [] (empty) and [b2, b3]."""
    if world == 2:
        return batches[:3] if rank == 0 else batches[3:]
    return [batches[:2], [], batches[2:]][rank]


def _report(rep):
    return {"loss": rep.loss, "S": rep.n_samples, "batches": rep.n_batches,
            "points": [{"mu": p.mu, "block": p.block, "phi": p.phi, "block_mu": p.block_mu, "route": p.route,
                        "converged": p.converged, "quotient": p.quotient} for p in rep.points]}


# ------------------------------------------------------------------------------------------------
# the job runner


def _worker(rank, world, init_file, out_dir, job):
    torch.set_num_threads(1)
    path = Path(out_dir)
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=90))
        result = JOBS[job](rank, world, path)
        torch.save(result, path / f"{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the test process
        (path / f"{rank}.err").write_text(traceback.format_exc())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_job(job, world, tmp):
    """Runs ``JOBS[job]`` on ``world`` spawned ranks; returns their results (fails on an error or a hang)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    init = tmp / "init"
    if init.exists():
        init.unlink()
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(init), str(tmp), job)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOB_TIMEOUT)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errs = {r: (tmp / f"{r}.err").read_text() for r in range(world) if (tmp / f"{r}.err").exists()}
    assert not hung, f"job {job!r}: ranks {hung} still running after {JOB_TIMEOUT} s (a rank waiting in a " \
                     f"collective the others never made?); errors: {errs}"
    assert not errs, f"job {job!r} failed:\n" + "\n".join(f"rank {r}:\n{e}" for r, e in errs.items())
    return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------------------
# jobs (run on every rank)


def _job_score(rank, world, path):
    out = {"reports": {}, "counters": {}}
    for name, (problem, kw) in CASES.items():
        model, batches, loss_fn = PROBLEMS[problem]()
        reset_comm_counters()
        out["reports"][name] = _report(td.score(model, _shards(world, rank, batches), loss_fn, **kw))
        out["counters"][name] = comm_counters()
    # the eps search and evaluate on the shards
    model, batches, loss_fn = PROBLEMS["mlp"]()
    best = td.score(model, _shards(world, rank, batches), loss_fn, rule="all").best
    out["eps"] = td.search_eps(model, best.point, best.phi, _shards(world, rank, batches), loss_fn)
    out["eval"] = td.evaluate(model, _shards(world, rank, batches), loss_fn)
    # opting out: group=False scores this rank's shard alone
    mine = _shards(world, rank, batches)
    out["local"] = _report(td.score(model, mine, loss_fn, rule="all", group=False)) if mine else None
    if world == 2:
        out.update(_paths(rank, world))
    return out


def _paths(rank, world):
    """Branches decided across ranks (2 ranks)."""
    out = {}
    model, batches, loss_fn = PROBLEMS["mlp"]()
    mine = _shards(world, rank, batches)
    # kept rows cost 2 x 3 points x (80 + 80) x 4 bytes = 3840 bytes per row: rank 0 (40 rows in its
    # first batch) exceeds this budget, rank 1 (16 rows in all) never does
    budget = 100_000
    reset_comm_counters()
    out["budget"] = _report(td.score(model, mine, loss_fn, rule="all", memory_budget=budget))
    out["budget_counters"] = comm_counters()
    # the route guard: rank 1 decides its route alone (as if it had not reduced the row count)
    from topoderiv.method import statistic
    real = statistic.ops.choose_route
    if rank == 1:
        statistic.ops.choose_route = lambda *a, **k: "dense"
    try:
        td.score(model, mine, loss_fn, route="auto", rule="all")
        out["guard"] = "no error"
    except RuntimeError as err:
        out["guard"] = str(err)
    finally:
        statistic.ops.choose_route = real
    # a rank with NaN data: every rank raises (none waits in a collective)
    bad = [(b[0].clone(), b[1]) for b in mine]
    if rank == 1:
        bad[0][0][0, 0] = float("nan")
    try:
        td.score(model, bad, loss_fn)
        out["nan"] = "no error"
    except (RuntimeError, ValueError) as err:
        out["nan"] = f"{type(err).__name__}: {err}"
    # different calls on the ranks: every rank raises
    try:
        td.score(model, mine, loss_fn, rule="all" if rank == 0 else "top")
        out["mismatch"] = "no error"
    except RuntimeError as err:
        out["mismatch"] = str(err)
    # process_group(False) around a call: no collective
    reset_comm_counters()
    with process_group(False):
        td.score(model, mine, loss_fn)
    out["optout_counters"] = comm_counters()
    return out


# growth: the same global batches on 1 and 2 ranks


def _grow_problem():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(200, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:]) + 0.5 * x[:, :1] ** 2
    return (x[:160], y[:160]), (x[160:], y[160:])


def _grower(rank, world, ck=None, callbacks=(), wrap=False, model=None, **kw):
    from topoderiv.experiments.tasks import Batches
    from topoderiv.growth import Grower, TopologicalStrategy

    train, val = _grow_problem()
    loader = Batches(*train, 40, shuffle=True, seed=3)  # global batches of 40 (the last of 0)
    if world > 1:
        loader = shard(loader, rank, world)
        val = shard(val, rank, world)
    if model is None:
        torch.manual_seed(0)
        model = ResidualMLP(2, 8, 1, 1)
    if wrap:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), loader, val, F.mse_loss,
                  strategy=TopologicalStrategy(rule="all", eps_grid=[0.05, 0.2, 0.5, 1.0]), epochs_per_round=3,
                  max_rounds=2, patience=10, progress=False, seed=0, checkpoint_dir=ck, callbacks=callbacks,
                  count_flops=False, **kw)


def _summary(grower):
    h = grower.history
    return {"points": [r.point for r in h.rounds], "eps": [r.eps for r in h.rounds],
            "train": [r.train_loss for r in h.rounds], "val": [r.val_loss for r in h.rounds],
            "mu": [r.mu for r in h.rounds], "depth": grower.depth,
            "params": {k: v.detach().clone() for k, v in grower.model.state_dict().items()}}


def _job_grow(rank, world, path):
    out = {}
    snaps = path / "snap"

    def snapshot(grower, rec):  # what an interruption after round 1 leaves (rank 0 wrote it)
        if rec.round == 1 and grower.is_writer:
            shutil.copytree(path / "ck", snaps)

    g = _grower(rank, world, ck=path / "ck", callbacks=[snapshot])
    g.run()
    out["plain"] = _summary(g)
    out["writer"] = g.is_writer
    out["ddp_type"] = type(g.train_model).__name__
    out["meta_processes"] = g.history.meta.get("processes")
    # resume from round 1 on every rank: the same end, bit for bit
    torch.distributed.barrier()
    from topoderiv.growth import Grower
    from topoderiv.experiments.tasks import Batches

    train, val = _grow_problem()
    torch.manual_seed(12345)
    r = Grower.from_checkpoint(snaps, shard(Batches(*train, 40, shuffle=True, seed=3), rank, world),
                               shard(val, rank, world), F.mse_loss, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                               checkpoint_dir=path / "ck-resumed")
    r.run()
    out["resumed"] = _summary(r)
    # a DDP-wrapped model given by the user
    g2 = _grower(rank, world, wrap=True)
    g2.run()
    out["ddp"] = _summary(g2)
    out.update(_fit_cases(rank, world))
    return out


def _fit_cases(rank, world):
    """fit of a DDP model: a global batch smaller than the world (an empty slice), unequal slices,
    and unequal batch counts (an error on every rank)."""
    out = {}
    batches = _batches(8, [1, 5, 8], (6,), 3)  # slices of 1 row: [0, 1] rows; of 5: [2, 3]
    torch.manual_seed(0)
    model = ResidualMLP(6, 8, 3, 1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    out["fit_losses"] = td.fit(ddp, opt, shard(batches, rank, world), F.mse_loss, 2)
    out["fit_params"] = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        td.fit(ddp, opt, batches[: 2 if rank == 0 else 1], F.mse_loss, 1)
        out["fit_uneven"] = "no error"
    except ValueError as err:
        out["fit_uneven"] = str(err)
    return out


JOBS = {"score": _job_score, "grow": _job_grow}


# ------------------------------------------------------------------------------------------------
# fixtures: each job runs once per module


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def score2(tmp_path_factory, one_thread):
    return _run_job("score", 2, tmp_path_factory.mktemp("score2"))


@pytest.fixture(scope="module")
def score3(tmp_path_factory, one_thread):
    return _run_job("score", 3, tmp_path_factory.mktemp("score3"))


@pytest.fixture(scope="module")
def grow2(tmp_path_factory, one_thread):
    return _run_job("grow", 2, tmp_path_factory.mktemp("grow2"))


@pytest.fixture(scope="module")
def single(one_thread):
    """Every case scored by one process on the concatenated batches."""
    out = {}
    for name, (problem, kw) in CASES.items():
        model, batches, loss_fn = PROBLEMS[problem]()
        out[name] = _report(td.score(model, batches, loss_fn, group=False, **kw))
    return out


def _close_phi(a, b, atol):
    """phi equal up to the sign of each eigenvector (rows of a matrix phi; each tensor of a dict)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            d = min(float((a[k] - b[k]).abs().max()), float((a[k] + b[k]).abs().max()))
            assert d <= atol, f"phi[{k}] differs by {d}"
        return
    assert a.shape == b.shape
    rows = torch.minimum((a - b).abs().amax(dim=1), (a + b).abs().amax(dim=1))
    assert float(rows.max()) <= atol, f"phi differs by {float(rows.max())} (row {int(rows.argmax())})"


def _tolerances(name):
    if "64" in name:
        return 1e-9, 1e-7
    if name in ("mlp_matfree_top", "mlp_bf16_matfree") or name.startswith("vit_tokens"):
        return 2e-5, 2e-3  # warm-started solves to 1e-3: round-off of the start moves phi a little more
    return 2e-5, 5e-4


def _same_report(got, ref, name):
    rtol, atol = _tolerances(name)
    assert got["S"] == ref["S"] and got["batches"] == ref["batches"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert len(got["points"]) == len(ref["points"])
    for i, (a, b) in enumerate(zip(got["points"], ref["points"])):
        assert a["route"] == b["route"], f"{name} point {i}: route {a['route']} vs {b['route']}"
        assert a["block"] == b["block"], f"{name} point {i}: r* {a['block']} vs {b['block']}"
        assert a["mu"] == pytest.approx(b["mu"], rel=rtol, abs=1e-12), f"{name} point {i}"
        assert a["quotient"] == pytest.approx(b["quotient"], rel=rtol * 10, abs=1e-12), f"{name} point {i}"
        scale = float(b["block_mu"].abs().max())
        assert float((a["block_mu"] - b["block_mu"]).abs().max()) <= rtol * 10 * scale + 1e-12
        assert a["converged"]
        _close_phi(a["phi"], b["phi"], atol)


# ------------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_uneven_shards_equal_one_process(score2, single, name):
    """2 ranks holding 3 and 1 of the 4 batches: each rank's report is the single-process report of
    all 4 (route, r*, mu, every block's top value, phi up to sign, loss, S, batch count)."""
    for rank, res in enumerate(score2):
        _same_report(res["reports"][name], single[name], f"{name} (rank {rank})")
    # every rank got the SAME report, bit for bit
    a, b = score2[0]["reports"][name], score2[1]["reports"][name]
    for pa, pb in zip(a["points"], b["points"]):
        assert pa["mu"] == pb["mu"] and pa["block"] == pb["block"]
        if isinstance(pa["phi"], dict):
            assert all(torch.equal(pa["phi"][k], pb["phi"][k]) for k in pa["phi"])
        else:
            assert torch.equal(pa["phi"], pb["phi"])


@pytest.mark.parametrize("name", list(CASES))
def test_three_ranks_with_an_empty_shard_equal_one_process(score3, single, name):
    """3 ranks, the middle one with NO batch (it still takes part in every collective)."""
    for rank, res in enumerate(score3):
        _same_report(res["reports"][name], single[name], f"{name} (rank {rank})")


def test_single_process_reports_match_float64_references(single, one_thread):
    """The single-process reports the ranks are compared with are right: float64 eigh of the dense
    blocks (torch backend) for the float64 model; float32 within 1e-4 of it."""
    model, batches, loss_fn = PROBLEMS["mlp64"]()
    ref = _report(td.score(model, batches, loss_fn, backend="torch", rule="all", group=False))
    for name in ("mlp64_dense", "mlp64_matfree"):
        for a, b in zip(single[name]["points"], ref["points"]):
            assert a["mu"] == pytest.approx(b["mu"], rel=1e-9)
            _close_phi(a["phi"], b["phi"], 1e-7)
    for a, b in zip(single["mlp_dense_all"]["points"], ref["points"]):
        assert a["mu"] == pytest.approx(b["mu"], rel=1e-4)


def test_collectives_dense_one_per_point_matfree_one_per_step(score2):
    """Dense: ONE block all-reduce per point, not per batch (rank 0 streamed 3 batches); the
    matrix-free route all-reduces once per Lanczos step and never a block."""
    c = score2[0]["counters"]
    assert c["mlp_dense_all"]["blocks"][0] == 3  # 3 points
    assert "matvec" not in c["mlp_dense_all"]
    n_cnn = len(score2[0]["reports"]["cnn_all"]["points"])
    assert c["cnn_all"]["blocks"][0] == n_cnn  # conv sites stream blocks
    n_vit = len(score2[0]["reports"]["vit_block_top"]["points"])
    assert c["vit_block_top"]["singular"][0] == n_vit  # a point's parts (attention, MLP) reduced together
    mf = c["mlp_matfree_top"]
    assert "blocks" not in mf and mf["matvec"][0] >= 3 and mf["warm"][0] == 2 * 3  # Gram + projected blocks
    # bytes of one matvec step: n_active x m floats
    assert mf["matvec"][1] <= mf["matvec"][0] * 80 * 81 * 4
    # both ranks made exactly the same collectives
    assert score2[0]["counters"] == score2[1]["counters"]


def test_memory_budget_exceeded_on_one_rank_makes_every_rank_stream(score2, single, one_thread):
    """Rank 0 exceeds the budget (and flushes its rows into blocks), rank 1 does not: both take the
    dense route, and the report is the single-process one with the same budget."""
    model, batches, loss_fn = PROBLEMS["mlp"]()
    for res in score2:
        rep = res["budget"]
        assert [p["route"] for p in rep["points"]] == ["dense"] * 3
        ref = _report(td.score(model, batches, loss_fn, rule="all", route="dense", group=False))
        _same_report(rep, ref, "budget")
        assert res["budget_counters"]["blocks"][0] == 3
    # without the budget the same data goes matrix-free (auto): the budget changed the path
    assert [p["route"] for p in single["mlp_matfree_all_tight"]["points"]] == ["matfree"] * 3


def test_ranks_that_would_take_different_routes_raise_everywhere(score2):
    """Rank 1 picks its route alone (tampered choose_route): every rank raises the route guard's
    error instead of running different collectives (or hanging)."""
    for res in score2:
        assert "agree on ['routes']" in res["guard"], res["guard"]


def test_a_failing_rank_stops_every_rank(score2):
    assert score2[1]["nan"].startswith("ValueError") and "NaN" in score2[1]["nan"]
    assert score2[0]["nan"].startswith("RuntimeError") and "rank(s) [1]" in score2[0]["nan"]
    for res in score2:
        assert "must agree on" in res["mismatch"] and "rule" in res["mismatch"]


def test_opting_out_makes_no_collective(score2, one_thread):
    for rank, res in enumerate(score2):
        assert res["optout_counters"] == {}
        # group=False: this rank's shard alone
        model, batches, loss_fn = PROBLEMS["mlp"]()
        ref = _report(td.score(model, _shards(2, rank, batches), loss_fn, rule="all", group=False))
        _same_report(res["local"], ref, "local")


@pytest.mark.parametrize("job", ["score2", "score3"])
def test_search_eps_and_evaluate_equal_one_process(request, job, one_thread):
    results = request.getfixturevalue(job)
    model, batches, loss_fn = PROBLEMS["mlp"]()
    best = td.score(model, batches, loss_fn, rule="all", group=False).best
    eps, losses = td.search_eps(model, best.point, best.phi, batches, loss_fn, group=False)
    full = td.evaluate(model, batches, loss_fn, group=False)
    for res in results:
        e, ls = res["eps"]
        assert e == eps and ls.keys() == losses.keys()
        for k in ls:
            assert ls[k] == pytest.approx(losses[k], rel=1e-6)
        assert res["eval"] == pytest.approx(full, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# the step-wise Lanczos (single process): the C++ iteration step for step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_stepwise_lanczos_is_the_cpp_iteration(dtype, k, one_thread):
    g = torch.Generator().manual_seed(0)
    B, m = 12, 40
    a = torch.randn(B, m, m, generator=g, dtype=torch.float64)
    a = ((a + a.mT) / 2).to(dtype)
    a[2] = 0  # a zero operator
    a[4] = torch.diag(torch.linspace(1, 2, m, dtype=dtype) * (torch.arange(m) < 6))  # rank 6: restarts
    a[7] *= 1e-3  # far below the shared norm: stops early
    v0 = torch.randn(B, m, generator=g)
    v0[5] = 0  # an all-zero start row falls back to the seeded vector
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for start in (None, v0):
        ref = ops.lanczos_topk(a, k, tol=tol, shared_norm=True, v0=start)
        got = steplanczos.lanczos_topk(lambda V, idx: torch.einsum("bij,bj->bi", a[idx], V), B, m, k, dtype=dtype,
                                       tol=tol, v0=start)
        assert torch.equal(got.steps, ref.steps)
        assert torch.equal(got.converged, ref.converged)
        scale = float(ref.norm.max())
        eps = torch.finfo(dtype).eps
        assert float((got.values - ref.values).abs().max()) <= 100 * eps * scale
        assert float((got.norm - ref.norm).abs().max()) <= 100 * eps * scale
        # b = 4 has a repeated eigenvalue: any basis of it; b = 2 is zero: with a v0 (its Krylov
        # space closes at once, then a random one) any unit vector of the 2-dim basis
        simple = [b for b in range(B) if b != 4 and (start is None or b != 2)]
        d = torch.minimum((got.vectors - ref.vectors).abs(), (got.vectors + ref.vectors).abs())[simple]
        assert float(d.max()) <= 1e4 * eps
        # the explicit residuals: the same up to rounding (after a restart: both below tol)
        assert float((got.residuals - ref.residuals).abs()[simple].max()) <= max(1e3 * eps, 0.1 * tol)
        assert float(got.residuals[4]) <= tol and float(ref.residuals[4]) <= tol


def test_stepwise_matfree_equals_the_cpp_matfree_route(one_thread):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(300, 70, generator=g)
    q = torch.randn(300, 9, generator=g) / 300
    from topoderiv.method.statistic import subspace_start

    v0 = subspace_start(u, q, True)
    for start, tol in ((None, 1e-5), (v0, 1e-3)):
        ref = ops.sensitivity_topk(u, q, route="matfree", tol=tol, v0=start)
        got = steplanczos.sensitivity_lanczos(u, q, None, tol=tol, v0=start)
        assert torch.equal(got.converged, ref.converged)
        assert float((got.values - ref.values).abs().max()) <= 1e-5 * float(ref.values.abs().max())
        d = torch.minimum((got.vectors - ref.vectors).abs(), (got.vectors + ref.vectors).abs())
        assert float(d.max()) < 1e-4


def test_start_vectors_are_the_cores():
    """The seeded start of a 1-step Lanczos (k = m = 1 would stop at once; use a rank-1 operator)."""
    m = 7
    ones = torch.ones(1, m, m, dtype=torch.float64)
    ref = ops.lanczos_topk(ones, 1, steps=1, tol=1.0)  # one step: the Ritz vector IS the start vector
    got = steplanczos.start_vectors(0, torch.tensor([0]), torch.tensor([0]), m)
    v = got[0] / got[0].norm()
    assert torch.allclose(ref.vectors[0, :, 0].abs(), v.abs(), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# groups, shards, errors (single process)


def test_group_arguments_and_errors():
    assert current_group(None) is None and current_group(False) is None
    assert communicator(None) is None
    with pytest.raises(TypeError, match="group must be None"):
        current_group("world")
    with pytest.raises(TypeError, match="group must be None"):
        td.score(_mlp(), _batches(0, [8], (6,), 3)[0], F.mse_loss, group=1)
    with process_group(False):
        assert current_group(None) is None


def test_shard_slices_every_batch():
    batches = _batches(0, [10, 3, 1], (2,), 1)
    parts = [list(shard(batches, r, 3)) for r in range(3)]
    for i, (x, y) in enumerate(batches):
        got = torch.cat([parts[r][i][0] for r in range(3)])
        assert torch.equal(got, x)
        assert [parts[r][i][0].shape[0] for r in range(3)] == [len(range(x.shape[0] * r // 3, x.shape[0] * (r + 1) // 3))
                                                               for r in range(3)]
    assert len(shard(batches, 0, 2)) == 3
    with pytest.raises(ValueError, match="rank must be < world"):
        Shard(batches, 2, 2)
    with pytest.raises(ValueError, match="world must be an int >= 1"):
        Shard(batches, 0, 0)
    with pytest.raises(TypeError, match="data must be"):
        Shard(torch.zeros(3), 0, 1)
    # the wrapped loader's data order advances exactly as unwrapped (iter() draws the permutation)
    from topoderiv.experiments.tasks import Batches
    a, b = Batches(*batches[0], 4, shuffle=True, seed=1), Batches(*batches[0], 4, shuffle=True, seed=1)
    s = shard(b, 0, 1)
    iter(a), iter(s)
    assert [t[0].tolist() for t in a] == [t[0].tolist() for t in s]
    assert s.state_dict()["epoch"] == a.state_dict()["epoch"]


# ------------------------------------------------------------------------------------------------
# growth


def test_two_rank_growth_equals_one_process_and_ranks_agree(grow2, one_thread, tmp_path):
    ref = _grower(0, 1)
    ref.run()
    ref = _summary(ref)
    assert grow2[0]["writer"] and not grow2[1]["writer"]
    assert grow2[0]["ddp_type"] == "DistributedDataParallel" and grow2[0]["meta_processes"] == 2
    for key in ("plain", "ddp"):
        a, b = grow2[0][key], grow2[1][key]
        # the same insertions on every rank, and parameters equal bit for bit
        assert a["points"] == b["points"] and a["eps"] == b["eps"]
        assert a["params"].keys() == b["params"].keys()
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        # the same run as one process on the same global batches
        assert a["points"] == ref["points"] and a["eps"] == ref["eps"] and a["depth"] == ref["depth"] == 3
        assert a["train"] == pytest.approx(ref["train"], rel=1e-4)
        assert a["val"] == pytest.approx(ref["val"], rel=1e-4)
        for r_mu, a_mu in zip(ref["mu"], a["mu"]):
            assert a_mu.keys() == r_mu.keys() and all(a_mu[p] == pytest.approx(r_mu[p], rel=1e-3) for p in a_mu)
        for k, v in ref["params"].items():
            assert torch.allclose(a["params"][k], v, atol=2e-4, rtol=1e-3), k


def test_two_rank_growth_resumes_bit_identically(grow2):
    for res in grow2:
        a, b = res["plain"], res["resumed"]
        assert a["points"] == b["points"] and a["eps"] == b["eps"] and a["train"] == b["train"]
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


def test_ddp_fit_weights_unequal_slices_and_refuses_unequal_batch_counts(grow2, one_thread):
    """Global batches of 1, 5 and 8 rows on 2 ranks (slices of 0 and 1 rows, 2 and 3, 4 and 4):
    the same steps as one process on the global batches (the empty slice joins with zero
    gradient, unequal slices are weighted by their share); unequal batch counts raise on every
    rank instead of leaving one waiting."""
    batches = _batches(8, [1, 5, 8], (6,), 3)
    torch.manual_seed(0)
    model = ResidualMLP(6, 8, 3, 1)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    losses = td.fit(model, opt, batches, F.mse_loss, 2)
    for res in grow2:
        assert res["fit_losses"] == pytest.approx(losses, rel=1e-5)
        for k, v in model.state_dict().items():
            assert torch.allclose(res["fit_params"][k], v, atol=1e-6), k
        assert "same number of batches" in res["fit_uneven"]
    assert all(torch.equal(grow2[0]["fit_params"][k], grow2[1]["fit_params"][k]) for k in model.state_dict())


@pytest.mark.skipif(shutil.which("topoderiv") is None, reason="console script not installed")
def test_cli_grow_distributed_reproduces_one_process(tmp_path, one_thread):
    """``topoderiv grow --distributed 2`` (torchrun underneath, gloo): the same insertions, losses
    within round-off and metrics as the single-process command; rank 0 wrote every file."""
    args = ["grow", "--task", "regression", "--n-train", "256", "--rounds", "1", "--epochs", "2", "--batch-size", "64",
            "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(["topoderiv", *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=JOB_TIMEOUT)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(["topoderiv", *args, "--out", str(tmp_path / "two"), "--distributed", "2"],
                         capture_output=True, text=True, env=env, timeout=JOB_TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("stopped growing") == 1  # rank 0 speaks for all
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    r1, r2 = h1["rounds"], h2["rounds"]
    assert [r["point"] for r in r1] == [r["point"] for r in r2] and [r["eps"] for r in r1] == [r["eps"] for r in r2]
    for a, b in zip(r1, r2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["mse"] == pytest.approx(m1["mse"], rel=1e-4) and m2["depth"] == m1["depth"]
    assert (tmp_path / "two" / "model" / "model.json").is_file() and (tmp_path / "two" / "checkpoint").is_dir()
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["args"]["distributed"] == 2
