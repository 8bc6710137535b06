"""Cost per module: FLOPs against FlopCounterMode and torchinfo, the formulas layerscope adds against the ops they
stand for, activation bytes against a reference made by hand with saved_tensors_hooks, meta-device estimates
against real runs, and what a cost capture leaves behind."""

from __future__ import annotations

import copy
import dataclasses
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F
import torchinfo
from torch import nn
from torch.utils._python_dispatch import _len_torch_dispatch_stack
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tvm

from layerscope import capture, findings, load
from layerscope.core.costs import FORMULAS
from models import LlamaLike, RaisesInside, no_hooks_left


def tiny_vit() -> nn.Module:
    return tvm.vit_b_16(weights=None, image_size=32)  # ViT-B/16 itself, on 2 x 2 patches


def small_vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)


def small_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


MODELS = {
    "resnet18": (lambda: tvm.resnet18(weights=None), lambda: torch.randn(2, 3, 32, 32)),
    "vit_b_16": (tiny_vit, lambda: torch.randn(2, 3, 32, 32)),
    "encoder": (small_encoder, lambda: torch.randn(2, 7, 32)),
}


def flop_counter(model: nn.Module, batch: torch.Tensor, backward: bool = False) -> dict[str, int]:
    """FlopCounterMode's inclusive count per module (by named_modules() name), with layerscope's extra formulas."""
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        out = model(batch)
        if backward:
            out.sum().backward()
    root = type(model).__name__
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return {"" if k == root else k.removeprefix(root + "."): n for k, n in counts.items() if k != "Global"} | {
        "<all>": counts.get("Global", 0)}


@pytest.fixture(scope="module", params=list(MODELS))
def costed(request):
    build, batch = MODELS[request.param]
    torch.manual_seed(0)
    model = build().eval()
    x = batch()
    return request.param, model, x, capture(model, x, costs=True)


def test_forward_flops_of_every_module_equal_flop_counter_modes(costed):
    name, model, x, cap = costed
    assert cap.error is None, cap.error
    expected = flop_counter(model, x)
    got = {n: r.flops for n, r in cap.modules.items() if r.called}
    assert got == {n: expected.get(n, 0) for n in got}
    for report in cap.modules.values():  # a module that never ran holds what its submodules ran
        if not report.called:
            assert report.flops == sum(cap[c].flops for c in report.children)
    assert cap.flops == cap[""].flops == expected["<all>"] > 0
    assert not cap[""].unsupported_ops


def test_own_flops_sum_to_the_root_and_each_module_holds_its_children(costed):
    _, _, _, cap = costed
    assert sum(r.own_flops for r in cap.modules.values()) == cap.flops
    for report in cap.modules.values():
        assert report.flops >= report.own_flops + sum(cap[c].flops for c in report.children)
        if not report.children:
            assert report.flops == report.own_flops


def test_backward_flops_total_equals_flop_counter_modes_and_each_layer_is_its_own(costed):
    name, model, x, cap = costed
    both = flop_counter(model, x, backward=True)
    model.zero_grad(set_to_none=True)
    forward = flop_counter(model, x)
    assert cap[""].backward_flops == both["<all>"] - forward["<all>"] > cap.flops
    for n, report in cap.modules.items():
        if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear)) and report.called:
            first = n in ("conv1", "conv_proj")  # its input is the batch: no gradient for it, only the weight's
            assert report.backward_flops == report.flops * (1 if first else 2), n


def test_conv_and_linear_flops_are_twice_torchinfos_mult_adds():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5, bias=False))
    for model, x in ((tvm.resnet18(weights=None).eval(), torch.randn(2, 3, 64, 64)), (head, torch.randn(3, 3, 20, 20))):
        names = {id(m): n for n, m in model.named_modules()}
        macs = {names[id(layer.module)]: layer.macs for layer in torchinfo.summary(model, input_data=x, verbose=0)
                .summary_list if isinstance(layer.module, (nn.Conv2d, nn.Linear)) and layer.module.bias is None}
        cap = capture(model, x, costs=True)
        assert len(macs) >= 3 and {n: cap[n].flops for n in macs} == {n: 2 * m for n, m in macs.items()}


def test_cpu_flash_attention_formulas_equal_the_math_it_stands_for():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, requires_grad=True) for _ in range(3))

    def counted(fn) -> tuple[int, int, set]:
        with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
            out = fn()
            forward = counter.get_total_flops()
            out.sum().backward()
        return forward, counter.get_total_flops() - forward, {str(op) for op in counter.get_flop_counts()["Global"]}

    fused = counted(lambda: F.scaled_dot_product_attention(q, k, v))
    math = counted(lambda: torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in fused[2] and "aten.bmm" in math[2]
    scores = 2 * 2 * 4 * 9 * 9 * 8  # one [9 x 8] @ [8 x 9] product per batch item and head
    assert fused[0] == math[0] == 2 * scores
    # the backward: the math path's four products, and, as torch counts flash kernels, the scores once more
    assert math[1] == 4 * scores and fused[1] == 5 * scores


@pytest.mark.parametrize("build, shape", [(small_encoder, (2, 7, 32)), (small_vit, (2, 3, 32, 32))])
def test_inference_fast_paths_count_what_the_layers_they_replace_count(build, shape):
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(shape)
    slow = capture(model, x, costs=True)  # autograd on: the layer by layer path
    fast = capture(model, x, costs=True, backward=False)  # no_grad in eval: the fused inference kernels
    assert slow.error is None and fast.error is None
    ops = {"aten._transformer_encoder_layer_fwd", "aten._native_multi_head_attention"}
    seen = {op for report in fast.modules.values() for op in report.unsupported_ops}
    assert not seen & ops
    assert fast.flops == slow.flops > 0


def test_unsupported_ops_are_listed_where_they_ran_and_make_a_finding():
    @torch.library.custom_op("layerscope_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    mystery.register_fake(lambda x: torch.empty_like(x))

    class Odd(nn.Module):
        def forward(self, x):
            return mystery(x)

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(Odd(), nn.ReLU()), nn.Linear(4, 2))
    cap = capture(model, torch.randn(3, 4), costs=True, backward=False)
    op = "layerscope_test.mystery"
    assert [n for n, r in cap.modules.items() if op in r.unsupported_ops] == ["", "1", "1.0"]
    assert cap.flops == cap["0"].flops + cap["2"].flops == 2 * 3 * 4 * 4 + 2 * 3 * 4 * 2
    finding = next(f for f in cap.findings if f.kind == "unsupported_ops")
    assert finding.severity == "info" and finding.module == "1.0" and op in finding.message
    assert "lower bound" in finding.message


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_by_hand(layers: list[nn.Module], x: torch.Tensor, model: nn.Module) -> tuple[list[dict[int, int]], int]:
    """Run a chain of layers one by one under saved_tensors_hooks: the storages (data pointer -> bytes) each
    saved, leaving out the model's parameters and buffers and the batch."""
    kept = _storages([*model.parameters(), *model.buffers(), x])
    per_layer: list[dict[int, int]] = []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in kept:
            per_layer[-1][s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = x
        for layer in layers:
            per_layer.append({})
            out = layer(out)
    return per_layer, out


def test_activation_bytes_against_saved_tensors_by_hand():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model = nn.Sequential(block, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.Tanh(),
                          nn.Dropout(0.3), nn.Linear(16, 4)).train()
    x = torch.randn(5, 3, 16, 16)
    layers = [*block, *list(model)[1:]]
    torch.manual_seed(1)
    per_layer, kept_alive = saved_by_hand(layers, x, model)
    torch.manual_seed(1)
    cap = capture(model, x, costs=True)
    names = ["0.0", "0.1", "0.2", "1", "2", "3", "4", "5", "6"]
    assert [cap[n].activation_bytes for n in names] == [sum(d.values()) for d in per_layer]
    union = lambda dicts: sum({k: v for d in dicts for k, v in d.items()}.values())
    assert cap["0"].activation_bytes == union(per_layer[:3])
    assert cap.activation_bytes == cap[""].activation_bytes == union(per_layer)
    # a storage saved by two ops counts once: ReLU's output is saved by ReLU and by the pooling after it
    assert cap.activation_bytes < sum(cap[n].activation_bytes for n in names)
    assert cap["0.2"].activation_bytes == 5 * 8 * 16 * 16 * 4 and cap["2"].activation_bytes == 0


def test_meta_estimates_equal_the_real_run():
    torch.manual_seed(0)
    for model, x in ((tvm.resnet18(weights=None).train(), torch.randn(2, 3, 32, 32)),
                     (LlamaLike(), torch.randint(0, 256, (2, 12)))):
        real = capture(model, x, costs=True)
        meta = capture(copy.deepcopy(model).to("meta"), x)  # costs are on by default on the meta device
        assert real.error is None and meta.error is None and meta.meta
        attention = {n for n, r in real.modules.items() if isinstance(model.get_submodule(n), type(model)) or
                     type(model.get_submodule(n)).__name__ in ("LlamaAttention", "LlamaBlock", "ModuleList")}
        for name, r in real.modules.items():
            m = meta[name]
            assert (m.flops, m.own_flops, m.param_bytes, m.buffer_bytes, m.output_bytes) == \
                (r.flops, r.own_flops, r.param_bytes, r.buffer_bytes, r.output_bytes), name
            if name not in attention:
                assert m.activation_bytes == r.activation_bytes, name
            else:  # attention on meta runs the math path, which keeps the attention weights for the backward
                assert m.activation_bytes >= r.activation_bytes, name
        assert meta.backward is False and meta[""].backward_flops is None and meta.peak_bytes is None


def test_memory_fields_of_resnet18():
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    cap = capture(model, torch.randn(2, 3, 32, 32))  # without costs=True: these are always recorded
    assert cap.flops is None and cap[""].activation_bytes is None and cap[""].flops is None
    assert cap[""].param_bytes == cap[""].grad_bytes == 4 * cap.total_params
    assert cap["bn1"].buffer_bytes == 64 * 4 * 2 + 8  # running mean and variance, and the int64 batch counter
    assert cap["conv1"].output_bytes == 2 * 64 * 16 * 16 * 4 and cap["fc"].output_bytes == 2 * 1000 * 4
    assert cap["relu"].output_bytes == 2 * 64 * 16 * 16 * 4
    assert cap["layer1.0.relu"].output_bytes == 2 * (2 * 64 * 8 * 8 * 4)  # called twice: both calls count
    assert cap[""].peak_bytes is None and cap.peak_bytes is None


def test_a_costs_capture_leaves_no_hooks_and_no_mode_also_when_the_model_fails():
    for model, x in ((LlamaLike(), torch.randint(0, 256, (2, 12))), (RaisesInside(), torch.randn(2, 4))):
        cap = capture(model, x, costs=True)
        assert no_hooks_left(model) and _len_torch_dispatch_stack() == 0
    assert cap.error is not None and cap.error.module == "block.1"
    assert cap["pre"].flops == cap[""].flops == 2 * 2 * 4 * 4 and cap[""].own_flops == 0  # up to the failure


def test_costs_survive_save_and_load_and_an_older_file_still_loads(tmp_path):
    cap = capture(LlamaLike(), torch.randint(0, 256, (2, 12)), costs=True)
    path = tmp_path / "capture.lsc"
    cap.save(path)
    loaded = load(path)
    for name, r in cap.modules.items():
        got = loaded[name]
        for field in ("flops", "own_flops", "backward_flops", "unsupported_ops", "param_bytes", "grad_bytes",
                      "buffer_bytes", "output_bytes", "activation_bytes", "peak_bytes"):
            assert getattr(got, field) == getattr(r, field), (name, field)
    assert (loaded.flops, loaded.activation_bytes, loaded.peak_bytes) == (cap.flops, cap.activation_bytes, None)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    doc = json.loads(members["layerscope.json"])
    doc["version"] = 1
    for field in ("flops", "activation_bytes", "peak_bytes"):
        del doc["capture"][field]
    for module in doc["modules"]:
        for field in ("flops", "own_flops", "backward_flops", "unsupported_ops", "param_bytes", "grad_bytes",
                      "buffer_bytes", "output_bytes", "activation_bytes", "peak_bytes"):
            del module[field]
    old = tmp_path / "old.lsc"
    with zipfile.ZipFile(old, "w") as zf:
        for name, data in {**members, "layerscope.json": json.dumps(doc).encode()}.items():
            zf.writestr(name, data)
    older = load(old)
    assert older.flops is None and older[""].flops is None and older[""].unsupported_ops == ()
    assert older[""].num_params == cap[""].num_params


def test_cost_breakdown_bars_are_each_parts_flops_and_saved_bytes():
    from matplotlib.colors import to_hex

    from layerscope import plots
    from layerscope.plots.cost import HIGHLIGHT

    torch.manual_seed(0)
    model, x = tvm.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    cap = capture(model, x, costs=True)
    flops_ax, memory_ax = plots.cost_breakdown(cap).axes
    labels = [t.get_text() for t in flops_ax.get_yticklabels()]
    assert sorted(labels) == sorted(c for c in cap[""].children if cap[c].flops or cap[c].activation_bytes)
    widths = [b.get_width() for b in flops_ax.patches]
    assert widths == [cap[n].flops for n in labels] == sorted(widths, reverse=True)
    assert [b.get_width() for b in memory_ax.patches] == [cap[n].activation_bytes for n in labels]
    assert f"{cap['layer1'].flops / cap.flops:.0%}" in flops_ax.texts[labels.index("layer1")].get_text()
    fig = plots.cost_breakdown(cap, "layer1.0.conv1")  # no submodules: its block's parts, itself highlighted
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    colours = [to_hex(b.get_facecolor()) for b in fig.axes[0].patches]
    assert "conv1" in labels and colours[labels.index("conv1")] == HIGHLIGHT.lower()
    assert colours.count(HIGHLIGHT.lower()) == 1 and "layer1.0" in fig.get_suptitle()
    with pytest.raises(ValueError, match="costs=True"):
        plots.cost_breakdown(capture(model, x, backward=False))


def test_a_module_holding_most_activation_memory_is_a_checkpointing_candidate():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
    model = nn.Sequential(nn.Linear(16, 8), wide, nn.Linear(512, 2))
    cap = capture(model, torch.randn(32, 16), costs=True)
    assert not [f for f in cap.findings if f.kind == "activation_memory"]  # 129 kB: memory is not the problem
    cap = dataclasses.replace(cap, findings=tuple(findings(cap, activation_floor=100_000)))
    finding = next(f for f in cap.findings if f.kind == "activation_memory")
    assert finding.severity == "info" and finding.module == "1"
    assert finding.details["share"] == cap["1"].activation_bytes / cap.activation_bytes > 0.5
    assert "torch.utils.checkpoint" in finding.message and "each of its" in finding.message
    assert not [f for f in capture(model, torch.randn(32, 16)).findings if f.kind == "activation_memory"]


def test_a_merged_capture_holds_the_jobs_flops_and_the_largest_ranks_memory():
    from layerscope.core import distributed

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(10, 6)
    ranks = [capture(model, x[:4], costs=True), capture(model, x[4:], costs=True)]  # two ranks' batches
    whole, merged = capture(model, x, costs=True), distributed.merge(ranks)
    for name, r in whole.modules.items():
        m = merged[name]
        assert (m.flops, m.own_flops, m.backward_flops, m.output_bytes) == \
            (r.flops, r.own_flops, r.backward_flops, r.output_bytes), name
        assert m.activation_bytes == max(c[name].activation_bytes for c in ranks) <= r.activation_bytes
    assert merged.flops == whole.flops and merged.activation_bytes == ranks[1].activation_bytes
