#!/usr/bin/env python3
# Saves the results of a fixed set of bnorm calls (the torch operators in every dtype, layout, mode,
# momentum in and outside [0, 1], eps = 0 in eval, fused forms, the variants, empty batches, the
# cumulative-average module, the NumPy path), to compare two builds bit for bit:
#   PYTHONPATH=<build A>/python python3 tools/same_bits.py a.pt
#   PYTHONPATH=<build B>/python python3 tools/same_bits.py b.pt
#   python3 tools/same_bits.py --compare a.pt b.pt
# Run both with the same thread count (the reductions' blocks follow it).
import sys

import numpy as np
import torch


def compare(a_path, b_path):
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        sys.exit(f"different result sets: {sorted(set(a) ^ set(b))[:5]}")
    def bits(t):
        t = t.contiguous()
        return t.view(torch.uint8) if t.numel() else t
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                   and a[k].stride() == b[k].stride() and torch.equal(bits(a[k]), bits(b[k])))]
    for k in differ:
        print(k, "max |a - b| =", (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0)
    print(f"{len(a)} results, {len(differ)} differ")


if len(sys.argv) == 4 and sys.argv[1] == "--compare":
    compare(sys.argv[2], sys.argv[3])
    sys.exit(0)

import bnorm
import bnorm.torch as bt

torch.manual_seed(0)
out = {}
def rec(name, *ts):
    for i, t in enumerate(ts):
        if t is None: continue
        if isinstance(t, np.ndarray): t = torch.from_numpy(t.copy())
        out[f"{name}.{i}"] = t.detach().clone()
ops = torch.ops.bnorm
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
  for fmt in (torch.contiguous_format, torch.channels_last):
    for shape in ((6, 5, 7, 9), (3, 4, 2, 2), (8, 16)):
      if len(shape) != 4 and fmt is torch.channels_last: continue
      x = (torch.randn(*shape) * 3 + 2).to(dtype)
      if len(shape) == 4: x = x.contiguous(memory_format=fmt)
      vd = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
      C = shape[1]
      w = torch.randn(C, dtype=vd); b = torch.randn(C, dtype=vd)
      for training in (True, False):
        for momentum in (0.1, 1.0, 1.7, -0.3):
          for eps in ((1e-5, 0.0) if not training else (1e-5,)):
            for relu, res in ((False, False), (True, False), (True, True)):
              key = f"{dtype}.{fmt}.{shape}.{training}.{momentum}.{eps}.{relu}.{res}"
              xi = x.clone().requires_grad_(dtype != torch.float16)
              wi = w.clone().requires_grad_(); bi = b.clone().requires_grad_()
              rm = torch.randn(C, dtype=vd); rv = torch.rand(C, dtype=vd) + 0.5
              if eps == 0.0: rv[0] = 0.0
              r = torch.randn_like(x) if res else None
              if res: y = ops.batch_norm_add_relu(xi, r, wi, bi, rm, rv, training, momentum, eps)
              elif relu: y = ops.batch_norm_relu(xi, wi, bi, rm, rv, training, momentum, eps)
              else: y = ops.batch_norm(xi, wi, bi, rm, rv, training, momentum, eps)
              g = torch.randn_like(y)
              if xi.requires_grad:
                y.backward(g)
                rec(key, y, rm, rv, xi.grad, wi.grad, bi.grad)
              else:
                rec(key, y, rm, rv)
      # variants
      if dtype in (torch.float32, torch.float64):
        for vbs in (2, 3):
          xi = x.clone().requires_grad_(); wi = w.clone().requires_grad_(); bi = b.clone().requires_grad_()
          rm = torch.zeros(C, dtype=vd); rv = torch.ones(C, dtype=vd)
          y = ops.ghost_batch_norm(xi, wi, bi, rm, rv, vbs, True, 0.1, 1e-5); y.backward(torch.ones_like(y) * 0.3 + y)
          rec(f"ghost.{dtype}.{fmt}.{shape}.{vbs}", y, rm, rv, xi.grad, wi.grad, bi.grad)
        xi = x.clone().requires_grad_(); wi = w.clone().requires_grad_(); bi = b.clone().requires_grad_()
        rm = torch.randn(C, dtype=vd) * 0.1; rv = torch.rand(C, dtype=vd) + 0.5
        y = ops.batch_renorm(xi, wi, bi, rm, rv, True, 1.5, 0.5, 0.1, 1e-5); y.backward(y * 0.5 + 1)
        rec(f"renorm.{dtype}.{fmt}.{shape}", y, rm, rv, xi.grad, wi.grad, bi.grad)
# empty batch, no running stats, no affine
for shape in ((0, 3, 4), (2, 3, 0)):
    x = torch.randn(*shape, requires_grad=True); rm = torch.randn(3); rv = torch.rand(3) + 1
    y = ops.batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5); y.sum().backward()
    rec(f"empty.{shape}", y, rm, rv, x.grad)
x = torch.randn(4, 3, 5, requires_grad=True)
y = ops.batch_norm(x, None, None, None, None, True, 0.1, 1e-5); y.backward(torch.randn_like(y)); rec("noaffine", y, x.grad)
# modules
m = bt.BatchNorm2d(5, momentum=None); m.train()
for i in range(3): y = m(torch.randn(4, 5, 3, 3) + i); rec(f"cum{i}", y, m.running_mean, m.running_var)
# NumPy path
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
  for training in (True, False):
    for momentum in (0.1, 1.5):
      for eps in ((1e-5,) if training else (1e-5, 0.0)):
        x = (rng.standard_normal((4, 3, 5)) * 2 + 1).astype(dt); rm = rng.standard_normal(3).astype(dt); rv = (rng.random(3) + 0.5).astype(dt)
        if eps == 0.0: rv[1] = 0
        y = bnorm.batch_norm(x, rm, rv, rng.standard_normal(3).astype(dt), rng.standard_normal(3).astype(dt), training, momentum, eps)
        dy = rng.standard_normal(x.shape).astype(dt)
        gi, gw, gb = bnorm.batch_norm_backward(dy, x, rm, rv, np.ones(3, dt), np.zeros(3, dt), training, momentum, max(eps, 1e-5) if training else eps)
        rec(f"np.{dt.__name__}.{training}.{momentum}.{eps}", y, rm, rv, gi, gw, gb)
x = np.zeros((0, 3, 4), np.float32); rm = np.ones(3, np.float32); rv = np.ones(3, np.float32)
rec("np.empty", bnorm.batch_norm(x, rm, rv, training=True), rm, rv)
torch.save(out, sys.argv[1])
print(len(out), "results")
