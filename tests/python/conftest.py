"""pytest configuration for bnorm's Python tests (run them with scripts/test_python)."""

import numpy as np
import torch

import bnorm


def pytest_report_header(config):
    return (f"bnorm {bnorm.__version__} from {bnorm.__file__} (kernel threads: {bnorm.num_threads()}); "
            f"numpy {np.__version__}; torch {torch.__version__}")
