import os
import sys

# Tiny models on a shared 2-core machine run several times faster on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic data set (images + JSONL), made once per test session."""
    from lightning_r1v2.data.synthetic import make_data

    out = tmp_path_factory.mktemp("tiny_data")
    make_data(str(out), train=64, val=16, seed=123, difficulty="easy")
    return out


@pytest.fixture(scope="session")
def processor():
    from lightning_r1v2.models.tiny import build_processor

    return build_processor()
