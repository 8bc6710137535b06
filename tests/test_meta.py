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


def test_a_7b_llama_on_meta_gets_its_costs_from_shapes_alone():
    from models import LlamaLike

    with torch.device("meta"):  # warm-up: torch loads its meta kernels once per process
        capture(LlamaLike(), torch.randint(0, 256, (1, 8)))
    process = psutil.Process()
    before = process.memory_info().rss
    with torch.device("meta"):
        model = LlamaLike.seven_b()
    cap = capture(model, torch.randint(0, 32000, (1, 512)))  # costs are on by default on the meta device
    grown = process.memory_info().rss - before
    assert grown < 50 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB"
    assert cap.error is None and cap.total_params == 6_738_415_616
    tokens, dim, hidden, heads = 512, 4096, 11008, 32
    attention = 4 * 2 * tokens * dim * dim + 2 * 2 * heads * tokens * tokens * (dim // heads)
    assert cap["layers.0.self_attn"].flops == attention
    assert cap["layers.0.mlp"].flops == 3 * 2 * tokens * dim * hidden
    assert cap["layers"].flops == 32 * cap["layers.0"].flops  # a ModuleList: what its layers ran
    assert cap.flops == cap["layers"].flops + cap["lm_head"].flops and not cap[""].unsupported_ops
    assert cap["layers.0.mlp.act_fn"].activation_bytes == tokens * hidden * 4  # SiLU keeps its input
    assert cap.activation_bytes > 32 * cap["layers.0.mlp"].activation_bytes > 0 and cap.peak_bytes is None
