"""bnorm.torch.SyncBatchNorm over torch.distributed (Gloo on loopback, 2 and 4 processes): equal to
one process on the global batch, DDP, errors on one rank, subgroups, a killed rank."""

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

import bnorm.torch as bt
from _dist import run_ranks

C = 3


def _global_batch(sizes, dtype, channels_last, seed=0):
    """The global batch (concatenated in rank order), its grad_output, and each rank's slices."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, C, 5, 4, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, -3.0, 10.0]).view(1, C, 1, 1)
    dy = torch.randn(n, C, 5, 4, generator=g, dtype=torch.float64)
    x, dy = x.to(dtype), dy.to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return x, dy, [(s, s + k) for s, k in zip(starts, sizes)]


def _params(bn, dtype):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return bn.to(dtype)


def _step(bn, x, dy):
    x = x.clone().requires_grad_(True)
    y = bn(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone(),
            "rm": bn.running_mean.clone(), "rv": bn.running_var.clone(), "n": int(bn.num_batches_tracked)}


CASES = [  # (per-rank batch sizes, dtype, channels_last)
    ((3, 2), torch.float32, False),
    ((4, 1), torch.float64, True),
    ((2, 0), torch.float32, True),  # an empty rank
    ((3, 4), torch.bfloat16, False),
    ((1, 3), torch.bfloat16, True),
]
CASES4 = [((2, 0, 3, 1), torch.float32, False), ((1, 2, 1, 4), torch.float64, True)]


def _sync_worker(rank, world, cases):
    out = []
    for sizes, dtype, cl in cases:
        x, dy, parts = _global_batch(sizes, dtype, cl)
        lo, hi = parts[rank]
        bn = _params(bt.SyncBatchNorm(C), dtype)
        res = [_step(bn, x[lo:hi], dy[lo:hi]) for _ in range(2)]  # twice: running statistics move on
        out.append(res)
    return out


def _check_against_one_process(cases, results):
    for i, (sizes, dtype, cl) in enumerate(cases):
        x, dy, parts = _global_batch(sizes, dtype, cl)
        ref_bn = _params(bt.BatchNorm2d(C), dtype)
        torch_bn = _params(torch.nn.BatchNorm2d(C), dtype)
        for step in range(2):
            ref = _step(ref_bn, x, dy)
            tref = _step(torch_bn, x, dy)
            # bfloat16 outputs are rounded once from (nearly) the same float64 value: within an ulp.
            tol = dict(rtol=8e-3, atol=8e-3) if dtype == torch.bfloat16 else \
                dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
            for rank, (lo, hi) in enumerate(parts):
                got = results[rank][i][step]
                what = f"case {i} {sizes} {dtype} cl={cl} step {step} rank {rank}"
                torch.testing.assert_close(got["y"], ref["y"][lo:hi], **tol, msg=lambda m: what + " y: " + m)
                torch.testing.assert_close(got["dx"], ref["dx"][lo:hi], **tol, msg=lambda m: what + " dx: " + m)
                for k in ("rm", "rv"):
                    torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=lambda m: what + " " + k + ": " + m)
                    # torch's bfloat16 statistics are less exact than bnorm's (about 1e-3 of their
                    # scale), then both are rounded to bfloat16 (an ulp: 2^-7 relative)
                    torch.testing.assert_close(got[k], tref[k], rtol=1e-2 if dtype == torch.bfloat16 else 1e-3,
                                               atol=4e-3 if dtype == torch.bfloat16 else 1e-3, msg=lambda m: what + " vs torch " + k + ": " + m)
                assert got["n"] == step + 1
                # every rank holds bitwise the same running statistics
                assert torch.equal(got["rm"], results[0][i][step]["rm"]) and torch.equal(got["rv"], results[0][i][step]["rv"])
            # weight and bias gradients are each rank's part: their sum is the global batch's (grads
            # accumulate over the two steps in both runs)
            for k in ("dw", "db"):
                total = sum(results[r][i][step][k].double() for r in range(len(parts)))
                # (bfloat16 gradients: each rank's part and the reference are rounded, and accumulated
                # over two steps in bfloat16: a few ulps, 2^-8 relative each)
                torch.testing.assert_close(total, ref[k].double(), rtol=2.5e-2 if dtype == torch.bfloat16 else 1e-5,
                                           atol=1e-2 if dtype == torch.bfloat16 else 1e-5, msg=lambda m: f"case {i} {k}: {m}")
            torch.testing.assert_close(ref["y"].double(), tref["y"].double(),
                                       rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                                       atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_two_ranks_equal_one_process_on_the_global_batch():
    _check_against_one_process(CASES, run_ranks(_sync_worker, 2, CASES))


def test_four_ranks_equal_one_process_on_the_global_batch():
    _check_against_one_process(CASES4, run_ranks(_sync_worker, 4, CASES4))


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(4, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 2))


def _batches(sizes, steps=3):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(sum(sizes), 1, 6, 6, generator=g) * 3 + 1 for _ in range(steps)]


def _train(model, batches, lo, hi, n_global, world):
    """SGD steps on rows lo:hi of each batch. The loss is scaled so that DDP's gradient average over
    `world` ranks is the gradient of the global batch's mean loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for x in batches:
        opt.zero_grad()
        loss = model(x[lo:hi]).square().sum() * (world / n_global)
        loss.backward()
        opt.step()


def _ddp_worker(rank, world, sizes, channels_last):
    model = bt.SyncBatchNorm.convert_sync_batchnorm(_net())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    lo = sum(sizes[:rank])
    _train(ddp, _batches(sizes), lo, lo + sizes[rank], sum(sizes), world)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sizes,channels_last", [((5, 3), False), ((2, 0, 4, 3), True)])
def test_ddp_sgd_steps_equal_one_process_on_the_global_batch(sizes, channels_last):
    states = run_ranks(_ddp_worker, len(sizes), sizes, channels_last)
    model = _net()
    _train(model, _batches(sizes), 0, sum(sizes), sum(sizes), 1)
    for k, v in model.state_dict().items():
        for rank, state in enumerate(states):
            torch.testing.assert_close(state[k], v, rtol=2e-4, atol=2e-5, msg=lambda m: f"rank {rank} {k}: {m}")
        assert torch.equal(states[0][k], states[-1][k]), k  # replicas identical, bitwise


def _bad_input_worker(rank, world):
    """Each bad input on rank 1 in turn: every rank must raise, nothing may change, and the group must
    stay in step (the correct call after each failure works)."""
    bn = _params(bt.SyncBatchNorm(C), torch.float32)
    good = torch.randn(4, C, 3, 3)
    bad = {
        "channels": torch.randn(4, C + 1, 3, 3),
        "dtype": torch.randn(4, C, 3, 3, dtype=torch.float64),
        "int dtype": torch.ones(4, C, 3, 3, dtype=torch.int64),
        "rank": torch.randn(4),
        "sparse": torch.randn(4, C, 3, 3).to_sparse(),
    }
    messages = {}
    for what, x in bad.items():
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        try:
            bn(x if rank == 1 else good)
            messages[what] = None
        except (ValueError, TypeError) as e:
            messages[what] = (type(e).__name__, str(e).splitlines()[0])
        after = bn.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), what
        y = bn(good)  # still in step
        assert y.shape == good.shape
    # ranks whose calls each pass their own checks but disagree: the descriptor exchange
    x = torch.randn(4, C, 3, 3, dtype=torch.float64 if rank == 1 else torch.float32)
    try:
        torch.ops.bnorm.sync_batch_norm(x, None, None, None, None, 0.1, 1e-5, dist.group.WORLD.group_name)
        messages["mixed dtypes"] = None
    except (ValueError, TypeError) as e:
        messages["mixed dtypes"] = (type(e).__name__, str(e).splitlines()[0])
    # backward: rank 1's grad_output of another channel count, through the operator itself
    x = good.clone().requires_grad_(True)
    out = torch.ops.bnorm.sync_batch_norm_forward(x, bn.weight, bn.bias, None, None, 0.1, 1e-5, dist.group.WORLD.group_name)
    dy = torch.randn(4, C + 1, 3, 3) if rank == 1 else torch.randn(4, C, 3, 3)
    try:
        torch.ops.bnorm.sync_batch_norm_backward(dy, good, bn.weight, out[1], out[2], 1e-5, dist.group.WORLD.group_name)
        messages["backward"] = None
    except (ValueError, TypeError) as e:
        messages["backward"] = (type(e).__name__, str(e).splitlines()[0])
    return messages


def test_a_bad_input_on_one_rank_raises_on_every_rank():
    results = run_ranks(_bad_input_worker, 2)
    assert results[0] == results[1]  # the same error on both ranks
    m = results[0]
    assert m["channels"][0] == "ValueError" and m["channels"][1].startswith("bnorm::sync_batch_norm: rank 1 of 2: "), m
    assert m["channels"][1].endswith("running_mean: expected 4 values (one per channel), got 3"), m
    assert m["dtype"] == ("TypeError", "bnorm::sync_batch_norm: rank 1 of 2: running_mean: expected dtype float64, got float32"), m
    assert m["mixed dtypes"] == ("TypeError", "bnorm::sync_batch_norm: rank 1 of 2: dtype: expected float32 (rank 0's), got float64"), m
    assert m["int dtype"][0] == "TypeError" and "rank 1 of 2: input: expected float32, float64, bfloat16 or float16, got int64" in m["int dtype"][1], m
    assert m["rank"][0] == "ValueError" and "rank 1 of 2: input:" in m["rank"][1], m
    assert m["sparse"][0] == "TypeError" and "rank 1 of 2: input: expected a dense (strided) tensor, got layout Sparse" in m["sparse"][1], m
    assert m["backward"][0] == "ValueError" and m["backward"][1].startswith("bnorm::sync_batch_norm_backward: rank 1 of 2: grad_output"), m


def _subgroup_worker(rank, world):
    # Every rank takes part in creating every group (torch's rule); each pair then normalizes over itself.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = pairs[rank // 2]
    sizes = (3, 2)
    x, dy, parts = _global_batch(sizes, torch.float32, False, seed=rank // 2)
    lo, hi = parts[rank % 2]
    bn = _params(bt.SyncBatchNorm(C, process_group=group), torch.float32)
    return _step(bn, x[lo:hi], dy[lo:hi])


def test_a_subgroup_process_group():
    results = run_ranks(_subgroup_worker, 4)
    for pair in range(2):
        x, dy, parts = _global_batch((3, 2), torch.float32, False, seed=pair)
        ref = _step(_params(bt.BatchNorm2d(C), torch.float32), x, dy)
        for member, (lo, hi) in enumerate(parts):
            got = results[2 * pair + member]
            torch.testing.assert_close(got["y"], ref["y"][lo:hi], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["dx"], ref["dx"][lo:hi], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["rm"], ref["rm"], rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0]["rm"], results[2]["rm"])  # the pairs did not mix


def _eval_worker(rank, world):
    """Eval with running statistics needs no other rank: rank 1 makes no call at all."""
    bn = _params(bt.SyncBatchNorm(C), torch.float32).eval()
    x = torch.randn(4, C, 3, 3)
    if rank == 1:
        return None
    local = _params(torch.nn.BatchNorm2d(C), torch.float32).eval()
    torch.testing.assert_close(bn(x), local(x))
    bn.train(False)
    return True


def test_eval_uses_the_running_statistics_without_communication():
    assert run_ranks(_eval_worker, 2) == [True, None]


def _killed_rank_worker(rank, world):
    bn = bt.SyncBatchNorm(C)
    bn(torch.randn(4, C, 3, 3))  # one step together
    if rank == 1:
        os._exit(3)  # dies without a word, as a killed process does
    start = time.monotonic()
    try:
        bn(torch.randn(4, C, 3, 3))
    except RuntimeError as e:
        raise RuntimeError(f"SyncBatchNorm raised after {time.monotonic() - start:.1f} s: {e}") from None
    return "returned"


def test_a_killed_rank_makes_the_others_fail_not_hang():
    timeout = datetime.timedelta(seconds=20)
    outcomes = run_ranks(_killed_rank_worker, 2, timeout=timeout, expect_failure=True)
    assert outcomes[1] == 3
    # rank 0's call raised torch's error within the process group's timeout (Gloo sees the closed
    # connection at once)
    assert isinstance(outcomes[0], str), outcomes
    last = outcomes[0].strip().splitlines()[-1]
    assert last.startswith("RuntimeError: SyncBatchNorm raised after "), last
    assert float(last.split(" after ")[1].split(" s")[0]) < timeout.total_seconds(), last


def test_convert_sync_batchnorm_shares_state_and_falls_back_without_a_process_group():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 1), torch.nn.BatchNorm2d(C), bt.BatchNorm1d(4),
                                torch.nn.SyncBatchNorm(5), torch.nn.LayerNorm(3))
    weight = model[1].weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = bt.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert [type(m).__name__ for m in converted] == ["Conv2d", "SyncBatchNorm", "SyncBatchNorm", "SyncBatchNorm",
                                                     "LayerNorm"]
    assert all(isinstance(m, bt.SyncBatchNorm) for m in converted[1:4])
    assert not isinstance(converted[1], torch.nn.SyncBatchNorm)  # DDP refuses those on the CPU
    assert converted[1].weight is weight and converted[1].process_group is None
    assert converted.state_dict().keys() == before.keys()
    assert bt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2)).num_features == 2
    # No process group: torch's fallback, plain BatchNorm (bnorm's), with torch's numbers.
    bn, ref = bt.SyncBatchNorm(C), torch.nn.BatchNorm2d(C)
    x = torch.randn(4, C, 3, 3)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bn(torch.randn(3))
    with pytest.raises(TypeError, match="convert_sync_batchnorm: expected a torch.nn.Module"):
        bt.SyncBatchNorm.convert_sync_batchnorm(3)


def test_the_ddp_example_trains_under_torchrun(tmp_path):
    """examples/ddp_syncbn.py as its docstring says to run it (torchrun, 2 processes), for 100 steps:
    it learns (test accuracy well above chance, 0.1) and says so."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.fail("Debian's dataset-fashion-mnist is missing (scripts/setup_torch installs it)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
                          os.path.join(root, "examples", "ddp_syncbn.py"), "--steps", "100", "--batch", "64"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy ") and last.endswith("after 100 steps of 64 over 2 ranks"), run.stdout
    assert float(last.split()[2]) > 0.4, run.stdout


def _compile_worker(rank, world):
    """torch.compile(fullgraph=True) of a model with SyncBatchNorm gives eager's numbers, and
    torch.library.opcheck passes for the collective operators (every rank runs it in step)."""
    torch._dynamo.config.cache_size_limit = 64
    sizes = (3, 2)
    x, dy, parts = _global_batch(sizes, torch.float32, True)
    lo, hi = parts[rank]
    results = {}
    for name in ("eager", "compiled"):
        bn = _params(bt.SyncBatchNorm(C), torch.float32)
        fn = torch.compile(bn, fullgraph=True) if name == "compiled" else bn
        xi = x[lo:hi].clone().requires_grad_(True)
        fn(xi).backward(dy[lo:hi])
        results[name] = (xi.grad, bn.weight.grad, bn.running_var.clone())
    for a, b in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    group = dist.group.WORLD.group_name
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    xi = x[lo:hi].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.bnorm.sync_batch_norm_forward.default,
                          (xi, w, b, torch.zeros(C), torch.ones(C), 0.1, 1e-5, group))
    torch.library.opcheck(torch.ops.bnorm.sync_batch_norm.default,
                          (xi, w.requires_grad_(True), b, torch.zeros(C), torch.ones(C), 0.1, 1e-5, group),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    return True


def test_torch_compile_and_opcheck_under_two_ranks():
    assert run_ranks(_compile_worker, 2) == [True, True]
