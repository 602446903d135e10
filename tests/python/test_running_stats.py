"""Running statistics you can trust (docs/running-statistics.md): recompute_batch_norm_stats against a
float64 computation over the whole data set (and how far torch.optim.swa_utils.update_bn and an
fvcore-style average of batch variances are from it), the non-finite guard, and one update per step
under torch.utils.checkpoint. Multi-process cases run over Gloo (_dist.run_ranks)."""

import copy
import logging

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import bnorm.torch as bt
from _dist import run_ranks

CLASSES = 5


def _data(dtype=torch.float64, batches=11, last=3, seed=0):
    """Class-sorted batches (each batch one class, whose images are offset by 2 * class), of 8
    samples except an uneven last one, with a common offset of 50 (mean / std ~ 1e1 to 1e2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        n = last if b == batches - 1 else 8
        x = 50.0 + 2.0 * (b % CLASSES) + torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)
        out.append((x.to(dtype), torch.full((n,), b % CLASSES)))
    return out


class Net(torch.nn.Module):
    def __init__(self, bn=torch.nn.BatchNorm2d):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.bn1 = bn(4)
        self.conv2 = torch.nn.Conv2d(4, 5, 1)
        self.bn2 = bn(5)
        self.drop = torch.nn.Dropout(0.0)
        self.head = torch.nn.Linear(5, CLASSES)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(x.mean((2, 3))))


def _net(dtype=torch.float64, bn=torch.nn.BatchNorm2d, seed=1):
    torch.manual_seed(seed)
    net = Net(bn).to(dtype)
    # Some training-time history in the running statistics, which recomputing replaces.
    net.train()
    with torch.no_grad():
        for x, _ in _data(dtype, batches=3, seed=99):
            net(x)
    return net


def _population(inputs):
    """float64 two-pass mean and unbiased variance per channel over the concatenated inputs."""
    x = torch.cat([i.double() for i in inputs]).transpose(0, 1).reshape(inputs[0].shape[1], -1)
    mean = x.sum(1) / x.shape[1]
    var = ((x - mean[:, None]) ** 2).sum(1) / (x.shape[1] - 1)
    return mean, var


def _bn_inputs(net, data, mode):
    """Each BN's inputs over the data, with the net as given in train mode (torch's BN normalizing with
    the batch statistics: the default mode's definition) or eval mode."""
    net = copy.deepcopy(net)
    seen = {name: [] for name, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    for name, m in net.named_modules():
        if name in seen:
            m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach().clone()))
    net.train(mode == "train")
    with torch.no_grad():
        for x, _ in data:
            net(x)
    return seen


def _rel(a, b):
    return ((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-300)).max().item()


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or (a[k].isnan().any() and torch.equal(a[k].isnan(), b[k].isnan())), k


def test_default_mode_is_the_float64_population_and_update_bn_is_not():
    data = _data()
    net = _net()
    net.eval()
    net.head.train()  # a per-module flag that must come back as it was
    inputs = _bn_inputs(net, data, "train")
    bt.recompute_batch_norm_stats(net, data)
    report = []
    swa = copy.deepcopy(_net())
    torch.optim.swa_utils.update_bn([x for x, _ in data], swa)
    for name in ("bn1", "bn2"):
        mean, var = _population(inputs[name])
        bn = getattr(net, name)
        assert _rel(bn.running_var, var) <= 1e-12, name
        assert (bn.running_mean - mean).abs().max() <= 1e-12 * (mean.abs() + var.sqrt()).max(), name
        assert bn.num_batches_tracked.item() == len(data)
        # update_bn's cumulative average of batch variances; an fvcore-style average of the same.
        batch_vars = torch.stack([i.double().transpose(0, 1).reshape(i.shape[1], -1).var(1) for i in inputs[name]])
        fvcore = batch_vars.mean(0)
        swa_err, fv_err = _rel(getattr(swa, name).running_var, var), _rel(fvcore, var)
        report.append(f"{name}: update_bn {swa_err:.3f}, fvcore-style {fv_err:.3f}, bnorm {_rel(bn.running_var, var):.1e}")
    print("\nrelative error of running_var against the float64 population (class-sorted batches):\n  "
          + "\n  ".join(report))
    # bn1 sees the class offsets directly: averaging batch variances misses their spread by far.
    assert _rel(swa.bn1.running_var, _population(inputs["bn1"])[1]) > 0.3
    assert not net.training and net.head.training and not net.bn1.training


def test_exact_for_eval_is_layer_by_layer_in_eval():
    data = _data()
    net = _net()
    bt.recompute_batch_norm_stats(net, data, exact_for_eval=True)
    ref = copy.deepcopy(_net())
    # bn1's eval input does not depend on any BN; bn2's does, through bn1's new statistics.
    m1, v1 = _population(_bn_inputs(ref, data, "eval")["bn1"])
    with torch.no_grad():
        ref.bn1.running_mean.copy_(m1)
        ref.bn1.running_var.copy_(v1)
    m2, v2 = _population(_bn_inputs(ref, data, "eval")["bn2"])
    for bn, (mean, var) in ((net.bn1, (m1, v1)), (net.bn2, (m2, v2))):
        assert _rel(bn.running_var, var) <= 1e-12
        assert (bn.running_mean - mean).abs().max() <= 1e-12 * (mean.abs() + var.sqrt()).max()
    assert net.training  # _net() left it in train mode
    # The default mode's bn2 differs: its input was normalized with batch statistics.
    default = _net()
    bt.recompute_batch_norm_stats(default, data)
    assert _rel(default.bn2.running_var, net.bn2.running_var) > 1e-3


def test_exact_for_eval_refuses_one_shot_iterators_and_caches_on_request():
    data = _data(batches=4)
    net = _net()
    before = _state(net)
    with pytest.raises(ValueError, match="expected a re-iterable .* got a one-shot list_iterator"):
        bt.recompute_batch_norm_stats(net, iter(data), exact_for_eval=True)
    with pytest.raises(ValueError, match="got a one-shot generator"):
        bt.recompute_batch_norm_stats(net, (b for b in data), exact_for_eval=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in data])), batch_size=8,
                                         shuffle=True)
    with pytest.raises(ValueError, match="got a DataLoader with shuffle=True"):
        bt.recompute_batch_norm_stats(net, loader, exact_for_eval=True)
    _same_state(net.state_dict(), before)
    cached, listed = _net(), _net()
    bt.recompute_batch_norm_stats(cached, (b for b in data), exact_for_eval=True, cache=True)
    bt.recompute_batch_norm_stats(listed, data, exact_for_eval=True)
    _same_state(cached.state_dict(), listed.state_dict())
    # The default mode reads a one-shot iterator once; num_batches takes the first ones.
    a, b = _net(), _net()
    bt.recompute_batch_norm_stats(a, iter(data), num_batches=2)
    bt.recompute_batch_norm_stats(b, data[:2])
    _same_state(a.state_dict(), b.state_dict())
    assert a.bn1.num_batches_tracked.item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bfloat16_inputs(dtype):
    """float32 models and bfloat16 inputs (a float32 BN on bfloat16 activations): the statistics of
    the values the BN saw, in float64, rounded once to the float32 buffers."""
    data = [(x.to(dtype), y) for x, y in _data(torch.float64)]
    net = torch.nn.Sequential(bt.BatchNorm2d(3), torch.nn.ReLU(), bt.BatchNorm2d(3))
    bt.recompute_batch_norm_stats(net, data)
    mean, var = _population([x for x, _ in data])
    assert torch.equal(net[0].running_var, var.float()) or _rel(net[0].running_var, var) <= 6e-8
    assert _rel(net[0].running_mean, mean) <= 6e-8
    assert net[0].running_var.dtype == torch.float32


def test_torch_and_bnorm_modules_alike():
    """torch's BatchNorm2d, torch's SyncBatchNorm (one process), bnorm's modules and bnorm's fused
    modules get the same statistics."""
    data = _data(torch.float32, batches=5)
    plain = _net(torch.float32)
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    converted = bt.convert(copy.deepcopy(plain))
    fused = bt.convert(copy.deepcopy(plain), fuse=True)
    bsync = bt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    for net in (plain, sync, converted, fused, bsync):
        bt.recompute_batch_norm_stats(net, data)
    want = plain.state_dict()
    for net in (sync, converted, fused, bsync):
        got = net.state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=2e-6, atol=1e-6, msg=f"{type(net).__name__} {k}")


def test_bad_inputs_are_refused_and_change_nothing():
    net = _net()
    before = _state(net)
    with pytest.raises(ValueError, match="batches: expected at least one batch, got an empty iterable"):
        bt.recompute_batch_norm_stats(net, [])
    with pytest.raises(ValueError, match="model: expected at least one BatchNorm with running statistics"):
        bt.recompute_batch_norm_stats(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.zeros(2, 2)])
    with pytest.raises(TypeError, match="batches: expected an iterable of batches"):
        bt.recompute_batch_norm_stats(net, torch.zeros(2, 3, 6, 6))
    with pytest.raises(ValueError, match="num_batches: expected None or an int >= 1, got 0"):
        bt.recompute_batch_norm_stats(net, _data(), num_batches=0)
    wrong = _data(batches=3)
    wrong[1] = (torch.zeros(8, 2, 6, 6, dtype=torch.float64), wrong[1][1])  # 2 channels for conv1's 3
    with pytest.raises(RuntimeError) as e:
        bt.recompute_batch_norm_stats(net, wrong)
    assert any("raised at batch 1; no running statistic was changed" in n for n in getattr(e.value, "__notes__", []))
    for bad in (float("nan"), float("inf")):
        data = _data(batches=3)
        data[2][0][0, 1, 2, 2] = bad
        with pytest.raises(ValueError, match=r"batch 2: bn1's input: .*expected finite values.*no running statistic "
                                             r"was changed"):
            bt.recompute_batch_norm_stats(net, data)
        with pytest.raises(ValueError, match="expected finite values"):
            bt.recompute_batch_norm_stats(net, data, exact_for_eval=True)
    _same_state(net.state_dict(), before)
    assert net.training


def test_progress_bar(capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain fallback, whether tqdm is installed or not
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bt.recompute_batch_norm_stats(_net(), _data(batches=3), progress=True)
    assert "batch 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Over Gloo: each rank its own batches (uneven; rank 1 of 3 none), equal to one process.

def _owner(b, world):
    if world == 2:
        return 0 if b % 3 == 0 else 1
    return 0 if b % 2 == 0 else 2  # rank 1 of 3 gets nothing


def _dist_worker(rank, world, exact, sync_modules):
    data = _data()
    net = _net()
    if sync_modules:
        net = bt.SyncBatchNorm.convert_sync_batchnorm(net)
    mine = [d for b, d in enumerate(data) if _owner(b, world) == rank]
    bt.recompute_batch_norm_stats(net, mine, exact_for_eval=exact,
                                  process_group=None if sync_modules else dist.group.WORLD)
    return {k: v for k, v in net.state_dict().items()}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("exact", [False, True])
def test_ranks_equal_one_process(world, exact):
    results = run_ranks(_dist_worker, world, exact, world == 2)
    one = _net()
    bt.recompute_batch_norm_stats(one, _data(), exact_for_eval=exact)
    for r in range(1, world):
        for k in results[0]:
            assert torch.equal(results[r][k], results[0][k]), f"rank {r} differs in {k}"
    for k, v in one.state_dict().items():
        if "running" in k:
            assert _rel(results[0][k], v) <= 1e-12, k
        else:
            assert torch.equal(results[0][k], v), k


def _dist_error_worker(rank, world):
    data = _data(batches=6)
    if rank == world - 1:
        data[1][0][0, 0, 0, 0] = float("nan")
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        bt.recompute_batch_norm_stats(net, data, process_group=dist.group.WORLD)
    except ValueError as e:
        message = str(e)
    after = net.state_dict()
    unchanged = all(torch.equal(after[k], before[k]) for k in before)
    # The group is still usable afterwards.
    bt.recompute_batch_norm_stats(net, _data(batches=2), process_group=dist.group.WORLD)
    return message, unchanged


def test_a_bad_batch_on_one_rank_raises_on_every_rank():
    results = run_ranks(_dist_error_worker, 3)
    assert all(r == results[0] for r in results)
    message, unchanged = results[0]
    assert message.startswith("bnorm.torch.recompute_batch_norm_stats: rank 2 of 3: ValueError: "), message
    assert "expected finite values" in message
    assert unchanged


# ---------------------------------------------------------------------------------------------
# The non-finite guard.

def test_guard_skips_nan_inf_and_one_channel(caplog):
    torch.manual_seed(0)
    bn = bt.BatchNorm2d(3)
    bn.skip_nonfinite = True
    bn(torch.randn(4, 3, 5, 5))
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(bn.state_dict())
    assert "nonfinite_skipped" not in str(bn.state_dict().keys())
    good = torch.randn(4, 3, 5, 5)
    nan_batch = torch.full_like(good, float("nan"))
    inf_batch = good.clone()
    inf_batch[1, 0, 2, 2] = float("inf")
    one_channel = good.clone()
    one_channel[3, 2, 0, 1] = float("nan")
    caplog.set_level(logging.WARNING, logger="bnorm.torch")
    for i, x in enumerate((nan_batch, inf_batch, one_channel), 1):
        state = _state(bn)
        out = bn(x)
        _same_state(bn.state_dict(), state)  # bitwise unchanged, num_batches_tracked included
        assert bn.nonfinite_skipped == i
        # The output is torch's: its NaNs where torch's are, its values elsewhere.
        want = torch.nn.functional.batch_norm(x, ref.running_mean.clone(), ref.running_var.clone(), bn.weight, bn.bias,
                                              True, 0.1, bn.eps)
        torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert sum("skip_nonfinite" in r.message for r in caplog.records) == 1  # logged once
    # A finite batch updates as usual.
    bn(good)
    assert bn.num_batches_tracked.item() == 2
    # Without the guard the NaN batch poisons the statistics for good.
    plain = bt.BatchNorm2d(3)
    plain(nan_batch)
    assert plain.running_var.isnan().all()


def test_guard_is_the_operators_defaulted_nonfinite_skips_argument():
    """The guard is one defaulted argument of the operators' schema; the library decides, the counter counts."""
    ops = torch.ops.bnorm
    for op in (ops.batch_norm, ops.batch_norm_relu, ops.batch_norm_add_relu, ops.sync_batch_norm):
        assert "Tensor(c!)? nonfinite_skips=None" in str(op.default._schema)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    bad = x.clone()
    bad[0, 1, 0, 0] = float("nan")
    # float32 values whose float64 variance is finite but not as float32 running_var stores it
    huge = torch.tensor([-3e38, 3e38, -3e38, 3e38]).reshape(4, 1, 1, 1).expand(4, 3, 1, 1).contiguous()

    def run(fn, batches):
        gen = torch.Generator().manual_seed(1)  # the same starting statistics for every fn
        rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
        c = torch.zeros((), dtype=torch.int64)
        seen = []
        for b in batches:
            before = (rm.clone(), rv.clone())
            fn(b, rm, rv, c)
            seen.append((int(c), torch.equal(rm, before[0]) and torch.equal(rv, before[1])))
        return seen, rm, rv

    def eager(b, rm, rv, c):
        return ops.batch_norm(b, None, None, rm, rv, True, 0.1, 1e-5, c)

    want = [(1, True), (2, True), (2, False)]  # NaN: skipped, overflow: skipped, finite: updated
    seen, rm, rv = run(eager, (bad, huge, x))
    assert seen == want
    # Not given (the default): torch's update, NaN and all.
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    ops.batch_norm(bad, None, None, rm2, rv2, True, 0.1, 1e-5)
    assert rm2[1].isnan() and not rm2[0].isnan()
    # A counter that is not a 0-dim int64 tensor is refused before anything changes.
    rm3, rv3 = torch.zeros(3), torch.ones(3)
    for wrong in (torch.zeros(()), torch.zeros(1, dtype=torch.int64)):
        with pytest.raises(ValueError, match="nonfinite_skips: expected a 0-dim int64 tensor"):
            ops.batch_norm(bad, None, None, rm3, rv3, True, 0.1, 1e-5, wrong)
        assert torch.equal(rm3, torch.zeros(3)) and torch.equal(rv3, torch.ones(3)) and not wrong.any()
    # torch.compile(fullgraph=True) carries the counter and the buffers as eager does.
    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
    seen_c, rm_c, rv_c = run(compiled, (bad, huge, x))
    assert seen_c == want and torch.equal(rm_c, rm) and torch.equal(rv_c, rv)


def test_convert_with_skip_nonfinite():
    net = bt.convert(_net(torch.float32), skip_nonfinite=True)
    assert net.bn1.skip_nonfinite and net.bn2.skip_nonfinite
    before = _state(net)
    x = _data(torch.float32, batches=1)[0][0]
    x[0, 0, 0, 0] = float("nan")
    net(x)
    _same_state(net.state_dict(), before)
    assert (net.bn1.nonfinite_skipped, net.bn2.nonfinite_skipped) == (1, 1)
    with pytest.raises(ValueError, match="skip_nonfinite: expected False with virtual_batch_size or renorm"):
        bt.convert(_net(torch.float32), virtual_batch_size=2, skip_nonfinite=True)
    sync = bt.SyncBatchNorm.convert_sync_batchnorm(net)
    assert sync.bn1.skip_nonfinite and sync.bn1.nonfinite_skipped == 1


def _guard_worker(rank, world):
    torch.manual_seed(rank)
    bn = bt.SyncBatchNorm(3)
    bn.skip_nonfinite = True
    x = torch.randn(2 + rank, 3, 4)
    if rank == 1:
        x[0, 2, 1] = float("nan")
    before = _state(bn)
    bn(x)
    skipped_nan = (bn.nonfinite_skipped, all(torch.equal(bn.state_dict()[k], before[k]) for k in before))
    bn(torch.randn(2, 3, 4))
    return skipped_nan, bn.num_batches_tracked.item(), bn.running_mean.clone()


def test_guard_is_global_under_sync_batch_norm():
    results = run_ranks(_guard_worker, 2)
    for (skipped, unchanged), tracked, mean in results:
        assert skipped == 1 and unchanged and tracked == 1
    assert torch.equal(results[0][2], results[1][2])


# ---------------------------------------------------------------------------------------------
# torch.utils.checkpoint: one update per training step.

class Block(torch.nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = bn(3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _train(bn, mode, steps=3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(Block(bn), Block(bn), torch.nn.Conv2d(3, 2, 1))
    if bn is bt.BatchNorm2d:
        net.apply(lambda m: setattr(m, "momentum", None) if isinstance(m, torch.nn.BatchNorm2d) else None)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=g, requires_grad=True)
        h = x
        for block in net[:2]:
            h = block(h) if mode == "plain" else checkpoint(block, h, use_reentrant=(mode == "reentrant"))
        net[2](h).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {k: v for k, v in net.state_dict().items() if "bn" in k}


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointed_statistics_equal_plain_ones(mode):
    plain, checked = _train(bt.BatchNorm2d, "plain"), _train(bt.BatchNorm2d, mode)
    for k in plain:
        assert torch.equal(plain[k], checked[k]), k
    assert plain["0.bn.num_batches_tracked"].item() == 3
    # torch's own BatchNorm counts the recomputation as a second step.
    torch_plain, torch_checked = _train(torch.nn.BatchNorm2d, "plain"), _train(torch.nn.BatchNorm2d, mode)
    assert torch_checked["0.bn.num_batches_tracked"].item() == 6 != torch_plain["0.bn.num_batches_tracked"].item()
