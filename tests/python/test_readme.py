"""README.md's Python examples, run as they are written, so that they stay true."""
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def readme_block(heading):
    """The ```python block under README's section `heading`."""
    text = README.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"README section {heading!r}: expected one python block, got {len(blocks)}"
    return blocks[0]


def test_numpy_example_normalizes_and_updates_running_statistics():
    ns = {}
    exec(readme_block("Using it from Python: NumPy"), ns)
    x = ns["x"].astype(np.float64)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    expected = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(ns["y"], expected, rtol=0, atol=1e-5)
    n = x.size // x.shape[1]
    np.testing.assert_allclose(ns["running_mean"], 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(ns["running_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-6)
    np.testing.assert_allclose(ns["stats"][0], mean, rtol=1e-6)  # float32 block sums merged in double (docs/numerics.md)
    np.testing.assert_allclose(ns["stats"][1], var, rtol=1e-6)  # float32 block sums merged in double (docs/numerics.md)


def test_torch_example_runs_on_bnorms_modules():
    torch = pytest.importorskip("torch")
    import bnorm.torch

    ns = {}
    exec(readme_block("Using it from PyTorch"), ns)
    assert isinstance(ns["bn"], bnorm.torch.BatchNorm2d)
    assert ns["bn"].weight.grad is not None and torch.isfinite(ns["bn"].weight.grad).all()
    assert isinstance(ns["model"][1], bnorm.torch.BatchNorm2d)
    assert ns["out"].shape == (4, 16, 30, 30) and torch.isfinite(ns["out"]).all()
