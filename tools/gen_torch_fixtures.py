#!/usr/bin/env python3
"""Writes tests/fixtures/torch_cases.safetensors: PyTorch's own BatchNorm results, replayed by
tests/test_torch_agreement.cpp against bnorm's functional API and layer.

Every case is a torch.nn.BatchNorm{1,2,3}d module (float32 or float64) driven through a sequence of
steps, each in training or eval mode, with a fresh random input per step. Per step the file holds
the input, torch's output (after the fused ReLU when the case has one), the batch mean and invstd
torch saved for backward (torch.native_batch_norm, cross-checked against the module), and the
running statistics after the step. The last step is then differentiated by autograd with a random
grad_output: grad_input, grad_weight, grad_bias.

Usage: python3 tools/gen_torch_fixtures.py [--out PATH] [--report]
  --report also prints, for every float32 case, how far torch's float32 results lie from the same
  computation in float64 (what a float32 tolerance has to allow for torch's own rounding).

The file is written with the safetensors format directly (no `safetensors` package): an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of 8 bytes, then the
raw little-endian tensor bytes, tensors in name order. Metadata (all values are strings):
  torch_version, numpy_version, generator, format  : provenance
  cases                                             : JSON list of case descriptions (see below)
Tensors of case `id` are named "<id>/<quantity>", all in logical (contiguous N, C, ...) order:
  weight, bias                         (affine only) the parameters the module starts from
  running_mean_init, running_var_init  (track_running_stats only) running statistics it starts from
  x<k>, y<k>                           input and output of step k (k = 0, 1, ...)
  save_mean<k>, save_invstd<k>         steps that normalize with batch statistics
  running_mean<k>, running_var<k>      (track_running_stats only) after step k
  grad_output, grad_input              the backward of the last step
  grad_weight, grad_bias               (affine only)
A case description: id, name (a readable identifier of [A-Za-z0-9_]), dtype ("float32" or
"float64"), shape, affine, track_running_stats, momentum (a number, or null for the cumulative
average), eps, activation ("none" or "relu"), steps (list of {"training": bool,
"batch_stats": bool, "num_batches_tracked": int}; batch_stats tells whether the step normalized
with batch statistics, i.e. training or not tracking), offset ("normal" or "large").
The generator is deterministic: fixed seeds, one torch thread.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np
import torch

FORMAT_VERSION = "1"
SEED = 20240611

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "fixtures", "torch_cases.safetensors")


# ------------------------------------------------------------------------------------------------
# The cases. steps: a string of 'T' (training step) and 'E' (eval step); the backward is taken
# through the last step. offset "large": inputs of mean ~100 and std ~0.1 (a badly conditioned
# variance); init_stats: the running statistics start non-trivial (eval cases always do).

def case(shape, dtype, steps="TTT", momentum=0.1, affine=True, track=True, act="none", eps=1e-5,
         offset="normal", init_stats=None):
    if init_stats is None:
        init_stats = steps[0] == "E"
    return dict(shape=list(shape), dtype=dtype, steps=steps, momentum=momentum, affine=affine,
                track=track, act=act, eps=eps, offset=offset, init_stats=init_stats)


F32, F64 = "float32", "float64"
CUM = None  # momentum=None: cumulative moving average

CASES = [
    # rank 2: BatchNorm1d on (N, C)
    case((4, 3), F32),
    case((4, 3), F64),
    case((4, 3), F32, momentum=0.3, affine=False),
    case((4, 3), F64, momentum=CUM, act="relu"),
    case((2, 5), F32),                                            # N = 2: two values per channel
    case((2, 5), F64, momentum=0.3, act="relu", eps=1e-3),
    case((7, 1), F32, momentum=CUM),                              # C = 1
    case((7, 1), F64, steps="E"),
    case((16, 6), F32, steps="E", act="relu"),
    case((16, 6), F64, steps="TTE"),
    case((16, 6), F32, track=False),
    case((16, 6), F64, track=False, affine=False, act="relu"),
    case((4, 3), F32, steps="E", affine=False, eps=1e-3),
    case((8, 4), F32, init_stats=True),
    case((4, 3), F64, track=False, affine=False, eps=1e-3),
    case((16, 6), F32, momentum=CUM, offset="large"),
    # rank 3: BatchNorm1d on (N, C, L)
    case((5, 13, 27), F32),
    case((5, 13, 27), F32, momentum=CUM, act="relu"),
    case((5, 13, 27), F64, steps="TTE", act="relu"),
    case((3, 4, 7), F64),
    case((3, 4, 7), F32, momentum=0.3, eps=1e-3),
    case((3, 4, 7), F64, momentum=CUM, affine=False),
    case((3, 4, 7), F32, steps="E"),
    case((3, 4, 7), F64, steps="E", act="relu"),
    case((3, 4, 7), F64, momentum=0.3, init_stats=True),
    case((3, 4, 7), F32, offset="large"),
    case((2, 3, 1), F32),                                         # N = 2, L = 1
    case((2, 3, 1), F64, momentum=CUM, act="relu"),
    case((4, 1, 9), F32, momentum=0.3),                           # C = 1
    case((4, 1, 9), F64, steps="TTE", momentum=CUM),
    case((1, 4, 6), F32, track=False),                            # N = 1
    case((1, 4, 6), F64, steps="E", track=False),                 # eval without running stats
    # rank 4: BatchNorm2d
    case((4, 7, 5, 6), F32),
    case((4, 7, 5, 6), F64),
    case((4, 7, 5, 6), F32, momentum=0.3, act="relu"),
    case((4, 7, 5, 6), F64, momentum=CUM, act="relu"),
    case((4, 7, 5, 6), F32, momentum=CUM, affine=False),
    case((4, 7, 5, 6), F32, steps="E"),
    case((4, 7, 5, 6), F64, steps="E", act="relu"),
    case((4, 7, 5, 6), F32, steps="TTE", act="relu"),
    case((4, 7, 5, 6), F32, track=False),
    case((4, 7, 5, 6), F64, steps="E", track=False, act="relu"),
    case((4, 7, 5, 6), F64, steps="E", eps=1e-3),
    case((2, 3, 1, 1), F32),                                      # H = W = 1
    case((2, 3, 1, 1), F64, momentum=0.3, affine=False, act="relu"),
    case((2, 3, 1, 1), F32, steps="E", act="relu"),
    case((3, 1, 4, 5), F32, momentum=CUM),                        # C = 1
    case((3, 1, 4, 5), F64, steps="E"),
    case((2, 4, 3, 5), F32, eps=1e-3),
    case((2, 4, 3, 5), F64, momentum=0.3, act="relu", eps=1e-3),
    case((2, 4, 3, 5), F32, momentum=0.3, act="relu", offset="large"),
    case((2, 4, 3, 5), F64, offset="large"),
    case((2, 4, 3, 5), F32, steps="E", offset="large"),
    case((2, 4, 3, 5), F32, steps="TTE", momentum=0.3, affine=False, init_stats=True),
    # rank 5: BatchNorm3d
    case((2, 5, 3, 4, 3), F32),
    case((2, 5, 3, 4, 3), F64),
    case((2, 5, 3, 4, 3), F32, momentum=CUM, act="relu"),
    case((2, 5, 3, 4, 3), F64, momentum=0.3, affine=False),
    case((2, 5, 3, 4, 3), F32, steps="E"),
    case((2, 5, 3, 4, 3), F64, steps="TTE", momentum=CUM, act="relu"),
    case((2, 5, 3, 4, 3), F32, track=False, act="relu"),
    case((2, 5, 3, 4, 3), F64, steps="E", act="relu", offset="large"),
    case((2, 2, 1, 1, 1), F32),                                   # two values per channel
    case((2, 2, 1, 1, 1), F64, momentum=CUM),
    case((1, 3, 2, 3, 2), F64, momentum=0.3, eps=1e-3),           # N = 1
    case((1, 3, 2, 3, 2), F32, steps="E", act="relu"),
    case((3, 1, 2, 2, 3), F32, act="relu"),                       # C = 1
    case((3, 1, 2, 2, 3), F64, steps="E", track=False),
    case((2, 5, 3, 4, 3), F32, steps="TTTE", momentum=0.3, eps=1e-3, act="relu"),
]


def module_class(rank):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[rank]


def case_name(c):
    def num(v):
        return ("%g" % v).replace(".", "p").replace("-", "m")
    parts = [c["dtype"].replace("float", "f"), "x".join(str(d) for d in c["shape"]),
             c["steps"].replace("T", "t").replace("E", "e")]
    parts.append("mcum" if c["momentum"] is None else "m" + num(c["momentum"]))
    if not c["affine"]:
        parts.append("noaffine")
    if not c["track"]:
        parts.append("notrack")
    if c["act"] == "relu":
        parts.append("relu")
    if c["eps"] != 1e-5:
        parts.append("eps" + num(c["eps"]))
    if c["offset"] == "large":
        parts.append("offset100")
    if c["init_stats"] and c["steps"][0] != "E":
        parts.append("initstats")
    return "_".join(parts)


# ------------------------------------------------------------------------------------------------
# Random data

def channel_profile(rng, C, offset):
    """Per-channel (offset, scale) of the inputs."""
    if offset == "large":
        return 100.0 + rng.uniform(-0.5, 0.5, C), 0.1 * rng.uniform(0.8, 1.25, C)
    return rng.uniform(-3.0, 3.0, C), rng.uniform(0.5, 2.0, C)


def random_input(rng, shape, off, scl, offset):
    """Normal values around the channel profile, drifted a little per step."""
    C = shape[1]
    bshape = [1, C] + [1] * (len(shape) - 2)
    if offset == "large":
        o = off + rng.normal(0.0, 0.02, C)
        s = scl * rng.uniform(0.8, 1.25, C)
    else:
        o = off + rng.normal(0.0, 0.5, C)
        s = scl * rng.uniform(0.8, 1.25, C)
    return o.reshape(bshape) + s.reshape(bshape) * rng.standard_normal(shape)


# ------------------------------------------------------------------------------------------------
# Running one case

def run_case(idx, c, tensors, report):
    dt = {F32: torch.float32, F64: torch.float64}[c["dtype"]]
    rng = np.random.default_rng([SEED, idx])
    shape, C = c["shape"], c["shape"][1]
    cid = "c%03d" % idx
    name = case_name(c)

    def put(key, t):
        tensors[cid + "/" + key] = t.detach().cpu().contiguous().clone()

    off, scl = channel_profile(rng, C, c["offset"])
    bn = module_class(len(shape))(C, eps=c["eps"], momentum=c["momentum"], affine=c["affine"],
                                  track_running_stats=c["track"]).to(dt)
    # A float64 twin (same start, same inputs) for --report.
    twin = module_class(len(shape))(C, eps=c["eps"], momentum=c["momentum"], affine=c["affine"],
                                    track_running_stats=c["track"]).to(torch.float64)
    with torch.no_grad():
        if c["affine"]:
            w = rng.uniform(0.5, 1.5, C) * np.where(rng.uniform(size=C) < 0.25, -1.0, 1.0)
            b = rng.uniform(-1.0, 1.0, C)
            bn.weight.copy_(torch.tensor(w))
            bn.bias.copy_(torch.tensor(b))
            put("weight", bn.weight)
            put("bias", bn.bias)
        if c["track"]:
            if c["init_stats"]:
                rm = off + rng.normal(0.0, 0.3, C) * scl
                rv = scl * scl * rng.uniform(0.5, 2.0, C)
                bn.running_mean.copy_(torch.tensor(rm))
                bn.running_var.copy_(torch.tensor(rv))
            put("running_mean_init", bn.running_mean)
            put("running_var_init", bn.running_var)
        twin.load_state_dict({k: v.double() if v.is_floating_point() else v
                              for k, v in bn.state_dict().items()})

    steps_desc = []
    errs = {}
    nsteps = len(c["steps"])
    for k, mode in enumerate(c["steps"]):
        training = mode == "T"
        last = k == nsteps - 1
        bn.train(training)
        twin.train(training)
        x = torch.tensor(random_input(rng, shape, off, scl, c["offset"])).to(dt)
        put("x%d" % k, x)
        batch_stats = training or not c["track"]

        # What native_batch_norm saves for backward, computed on copies of the state the module
        # is about to update; the module's factor for momentum=None is 1 / num_batches_tracked.
        if batch_stats:
            if c["track"] and training:
                nbt = int(bn.num_batches_tracked.item()) + 1
                factor = 1.0 / nbt if c["momentum"] is None else c["momentum"]
                rm_copy, rv_copy = bn.running_mean.clone(), bn.running_var.clone()
            else:
                factor, rm_copy, rv_copy = 0.0, None, None
            with torch.no_grad():
                ref_out, save_mean, save_invstd = torch.native_batch_norm(
                    x, bn.weight, bn.bias, rm_copy, rv_copy, True, factor, c["eps"])
        xg = x.clone().requires_grad_(last)
        y = bn(xg)
        if c["act"] == "relu":
            y = torch.relu(y)
        with torch.no_grad():
            xt = x.double().requires_grad_(last)
        yt = twin(xt)
        if c["act"] == "relu":
            yt = torch.relu(yt)

        # Cross-checks: the module and native_batch_norm agree exactly.
        if batch_stats:
            ref_y = torch.relu(ref_out) if c["act"] == "relu" else ref_out
            assert torch.equal(ref_y, y.detach()), (name, k, "output")
            if rm_copy is not None:
                assert torch.equal(rm_copy, bn.running_mean), (name, k, "running_mean")
                assert torch.equal(rv_copy, bn.running_var), (name, k, "running_var")
            put("save_mean%d" % k, save_mean)
            put("save_invstd%d" % k, save_invstd)
            # And they are what the formulas say.
            dims = [0] + list(range(2, len(shape)))
            xd = x.double()
            mean = xd.mean(dim=dims)
            var = xd.var(dim=dims, unbiased=False)
            tol = 1e-5 if dt == torch.float32 else 1e-12
            assert torch.allclose(save_mean.double(), mean, rtol=tol, atol=tol * 10), (name, k)
            assert torch.allclose(save_invstd.double(), 1 / torch.sqrt(var + c["eps"]), rtol=tol * 10), (name, k)
        put("y%d" % k, y)
        if c["track"]:
            put("running_mean%d" % k, bn.running_mean)
            put("running_var%d" % k, bn.running_var)
        nbt_now = int(bn.num_batches_tracked.item()) if c["track"] else 0
        steps_desc.append({"training": training, "batch_stats": batch_stats, "num_batches_tracked": nbt_now})

        if report:
            def err(key, got, want):
                scale = max(want.abs().max().item(), 1e-300)
                e = (got.detach().double() - want.detach()).abs().max().item() / scale
                errs[key] = max(errs.get(key, 0.0), e)
            err("y", y, yt)
            if c["track"]:
                err("running_mean", bn.running_mean, twin.running_mean)
                err("running_var", bn.running_var, twin.running_var)

        if last:
            gy = torch.tensor(rng.standard_normal(shape)).to(dt)
            y.backward(gy)
            yt.backward(gy.double())
            put("grad_output", gy)
            put("grad_input", xg.grad)
            if c["affine"]:
                put("grad_weight", bn.weight.grad)
                put("grad_bias", bn.bias.grad)
            if report:
                err("grad_input", xg.grad, xt.grad)
                if c["affine"]:
                    err("grad_weight", bn.weight.grad, twin.weight.grad)
                    err("grad_bias", bn.bias.grad, twin.bias.grad)

    if report and dt == torch.float32:
        print("%s %-48s %s" % (cid, name, " ".join("%s=%.1e" % kv for kv in sorted(errs.items()))))

    desc = {"id": cid, "name": name, "dtype": c["dtype"], "shape": shape, "affine": c["affine"],
            "track_running_stats": c["track"], "momentum": c["momentum"], "eps": c["eps"],
            "activation": c["act"], "offset": c["offset"], "steps": steps_desc}
    return desc


# ------------------------------------------------------------------------------------------------
# safetensors writer

ST_DTYPES = {torch.float32: ("F32", "<f4"), torch.float64: ("F64", "<f8"), torch.int64: ("I64", "<i8")}


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    chunks = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        code, np_dtype = ST_DTYPES[t.dtype]
        raw = t.numpy().astype(np_dtype, copy=False).tobytes(order="C")
        header[key] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in chunks:
            f.write(raw)
    os.replace(tmp, path)
    return 8 + len(text) + offset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # nothing below draws from torch's generator; set for safety
    tensors, descs = {}, []
    for idx, c in enumerate(CASES):
        descs.append(run_case(idx, c, tensors, args.report))
    names = [d["name"] for d in descs]
    assert len(set(names)) == len(names), "case names must be unique"

    metadata = {
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "generator": "tools/gen_torch_fixtures.py",
        "format": FORMAT_VERSION,
        "cases": json.dumps(descs, separators=(",", ":")),
    }
    size = write_safetensors(args.out, tensors, metadata)
    print("wrote %s: %d cases, %d tensors, %d bytes (torch %s)" % (
        os.path.normpath(args.out), len(descs), len(tensors), size, torch.__version__))


if __name__ == "__main__":
    sys.exit(main())
