"""Meta-device models: the structure and counts of a huge model with no memory."""

import psutil
import torch
from torch import nn

from layerscope import capture


def test_meta_model_tree_and_counts_without_memory():
    with torch.device("meta"):
        capture(nn.Linear(4, 4), torch.randn(2, 4))  # warm-up: torch loads its kernels once per process
    process = psutil.Process()
    before = process.memory_info().rss
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(32)])  # 537M parameters, 2 GB if real
    cap = capture(model, torch.randn(2, 4096))
    grown = process.memory_info().rss - before
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB"
    assert cap.error is None and not cap.backward
    assert cap.total_params == 32 * (4096 * 4096 + 4096)
    assert cap["31"].calls[0].output_shapes == (2, 4096)
    assert cap["31"].calls[0].stats is None and cap["31"].devices == ("meta",)
    assert all(p.is_meta for p in model.parameters())


def test_a_meta_submodule_in_a_cpu_model_is_a_clear_device_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to("meta"))
    cap = capture(model, torch.randn(2, 4))
    assert cap.error.module == "1" and "meta" in cap.error.message and "cpu" in cap.error.message
    assert cap["1"].devices == ("meta",) and cap[""].devices == ("cpu", "meta")
