#!/usr/bin/env python3
# Run: pip install --no-deps "torchvision==0.29.*" pillow; scripts/build_python; PYTHONPATH=build/python python3 tools/torchvision_check.py
# A user's check: torchvision resnet18 with bnorm's BatchNorm (bnorm.torch.convert) against torch's,
# eval and one SGD step, both memory formats. Prints max differences.
import copy, torch, torchvision
import bnorm.torch as bt
torch.set_num_threads(2)
torch.manual_seed(0)
ref = torchvision.models.resnet18(num_classes=10)
with torch.no_grad():  # non-trivial running statistics
    ref.train(); ref(torch.randn(8, 3, 64, 64))
for fmt in (torch.contiguous_format, torch.channels_last):
    a = copy.deepcopy(ref).to(memory_format=fmt); b = bt.convert(copy.deepcopy(ref).to(memory_format=fmt))
    x = torch.randn(4, 3, 64, 64).to(memory_format=fmt)   # not the input the statistics came from
    a.eval(); b.eval()
    with torch.no_grad():
        d_eval = (a(x) - b(x)).abs().max().item()
    a.train(); b.train()
    try:
        oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
        la = a(x).square().mean(); lb = b(x).square().mean()
        la.backward(); lb.backward()
        dg = max((p.grad - q.grad).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
        oa.step(); ob.step()
        drm = max((m1.running_mean - m2.running_mean).abs().max().item()
                  for m1, m2 in zip(a.modules(), b.modules()) if hasattr(m1, "running_mean"))
        a.eval(); b.eval()
        with torch.no_grad():
            d_after = (a(x) - b(x)).abs().max().item()
        print(f"{fmt}: eval max|diff| {d_eval:.2e}; train loss {la.item():.6f} vs {lb.item():.6f}, "
              f"max|grad diff| {dg:.2e}, max|running_mean diff| {drm:.2e}, eval after step {d_after:.2e}")
    except Exception as e:
        print(f"{fmt}: eval max|diff| {d_eval:.2e}; training: {type(e).__name__}: {str(e)[:120]}")
