import io
import math
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.collections import PathCollection, QuadMesh  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import nn  # noqa: E402

import layerscope  # noqa: E402
from layerscope import plots  # noqa: E402
from layerscope.plots.gradients import COLORS  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class Finding:  # what the findings module reports: a kind and the module it is about
    kind: str
    module: str


@pytest.fixture(scope="module")
def squeeze():
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None).eval()
    batch = torch.randn(2, 3, 64, 64)
    target = torch.tensor([3, 7])
    return model, batch, target, layerscope.capture(model, batch, target=target)


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before  # the plot functions leave nothing in pyplot's state


def png(fig: Figure) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return plt.imread(buf, format="png")


def rgba(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).astype(float) / 255


def texts(fig: Figure) -> list:
    return [t for ax in fig.axes for t in ax.texts]


def images(ax) -> list[np.ndarray]:
    return [im.get_array() for im in ax.get_children() if isinstance(im, AxesImage)]


def tiles(image: np.ndarray) -> list[np.ndarray]:
    """The tiles of a mosaic, row by row, split at the all-NaN rows and columns between them."""
    empty = np.isnan(image).reshape(image.shape[0], image.shape[1], -1).all(axis=-1)

    def runs(filled):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], filled.astype(int), [0]])))
        return list(zip(edges[::2], edges[1::2]))

    rows = runs(~empty.all(axis=1))
    cols = runs(~empty.all(axis=0))
    found = [image[r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]
    return [t for t in found if not np.isnan(t).all()]


def test_histogram_bars_are_the_recorded_counts(squeeze):
    *_, cap = squeeze
    record = cap["features.1"].calls[0]
    stats, hist = record.stats, record.histogram
    assert hist.sampled < stats.numel  # 2 x 64 x 31 x 31 values: the histogram is sampled
    fig = plots.activation_histogram(record)
    assert isinstance(fig, Figure)
    bars = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    np.testing.assert_array_equal([b.get_height() for b in bars], hist.counts)
    np.testing.assert_allclose([b.get_x() for b in bars], hist.edges[:-1])
    np.testing.assert_allclose([b.get_width() for b in bars], np.diff(hist.edges))
    words = "\n".join(t.get_text() for t in texts(fig))
    assert f"mean {stats.mean:.4g}" in words and f"std {stats.std:.4g}" in words
    assert f"min {stats.min:.4g}" in words and f"max {stats.max:.4g}" in words
    assert f"{stats.zero_fraction:.1%}" in words
    assert 0.4 < stats.zero_fraction < 0.6  # a ReLU of roughly centred values
    assert f"sampled {hist.sampled:,} of {stats.numel:,}" in words
    assert "NaN" not in words
    assert png(fig).shape[:2] == (320, 800)  # 8 x 3.2 inches at 100 dpi


def test_histogram_of_an_exact_record_says_nothing_about_sampling(squeeze):
    *_, cap = squeeze
    record = cap[""].calls[0]  # logits: 2 x 1000 values, all binned
    fig = plots.activation_histogram(record)
    assert record.histogram.sampled == record.stats.numel == 2000
    assert sum(p.get_height() for p in fig.axes[0].patches) == 2000
    words = "\n".join(t.get_text() for t in texts(fig))
    assert "sampled" not in words and "2 x 1000" in fig.axes[0].get_title(loc="left")


def test_histogram_warns_in_red_about_nan_and_inf():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    x = torch.randn(5, 4)
    x[1, 2] = float("nan")  # row 1 of the Linear's output: 8 NaN
    x[3, 0] = float("inf")  # row 3: +-inf wherever the weight is non-zero
    cap = layerscope.capture(model, x, backward=False)
    record = cap["0"].calls[0]
    out = model[0](x).detach().numpy()
    nans, infs = int(np.isnan(out).sum()), int(np.isinf(out).sum())
    assert (nans, infs) == (8, 8) == (record.stats.nan_count, record.stats.inf_count)
    fig = plots.activation_histogram(record)
    warning = [t for t in texts(fig) if "NaN" in t.get_text()]
    assert len(warning) == 1
    assert warning[0].get_text().startswith("8 NaN and 8 Inf values")
    red = np.array(to_rgba(warning[0].get_color()))
    assert red[0] > 0.6 and red[1] < 0.3 and red[2] < 0.3
    bars = fig.axes[0].patches
    finite = out[np.isfinite(out)]
    assert sum(b.get_height() for b in bars) == finite.size == 24
    np.testing.assert_array_equal([b.get_height() for b in bars], np.histogram(finite, bins=64)[0])
    png(fig)


def test_feature_maps_show_every_channel_on_one_scale(squeeze):
    model, batch, _, cap = squeeze
    record = cap["features.0"].calls[0]
    expected = model.features[0](batch[:1])[0, :16].detach().numpy()  # conv output of item 0: 64 x 31 x 31
    np.testing.assert_allclose(record.feature_maps.float().numpy(), expected, rtol=2**-8, atol=1e-6)  # bfloat16
    expected = record.feature_maps.float().numpy()  # the picture shows the stored (bfloat16) values
    fig = plots.feature_maps(record)
    ax = fig.axes[0]
    (shown,) = [im for im in ax.get_children() if isinstance(im, AxesImage)]
    found = tiles(shown.get_array().filled(np.nan))
    assert len(found) == 16
    for tile, channel in zip(found, expected):
        np.testing.assert_allclose(tile, channel, atol=1e-5)
    bound = np.abs(expected).max()  # values of both signs: a diverging scale centred on zero
    np.testing.assert_allclose(shown.get_clim(), (-bound, bound), rtol=1e-5)
    assert len(fig.axes) == 2  # the image and its one colorbar
    assert [t.get_text() for t in ax.texts] == [str(i) for i in range(16)]
    assert ax.get_title(loc="left") == "Channels 0–15 of 64, item 0"
    fig = plots.feature_maps(cap["features.2"].calls[0], max_channels=5)  # after a ReLU: 0 and up
    (shown,) = [im for im in fig.axes[0].get_children() if isinstance(im, AxesImage)]
    assert len(tiles(shown.get_array().filled(np.nan))) == 5 and shown.get_clim()[0] == 0
    png(fig)


def _layer_norms_by_autograd(model, batch, target):
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    try:
        loss = F.cross_entropy(model(batch), target)
    finally:
        for h in hooks:
            h.remove()
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    norms = []
    for name in order:
        own = [grads[f"{name}.{local}"] for local, _ in model.get_submodule(name).named_parameters(recurse=False)]
        norms.append(math.sqrt(sum(float(g.double().square().sum()) for g in own)))
    return order, norms


def test_gradient_flow_plots_autograd_norms_in_execution_order(squeeze):
    model, batch, target, cap = squeeze
    order, norms = _layer_norms_by_autograd(model, batch, target)
    assert len(order) == 26  # 1 stem conv + 8 fire modules x 3 convs + the classifier conv
    fig = plots.gradient_flow(cap)
    ax = fig.axes[0]
    (dots,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    np.testing.assert_allclose(dots.get_offsets()[:, 0], norms, rtol=1e-4)  # float32 accumulation
    np.testing.assert_array_equal(dots.get_offsets()[:, 1], np.arange(26))
    assert [t.get_text() for t in ax.get_yticklabels()] == order  # every name fits, one row each
    assert ax.get_xscale() == "log" and ax.get_ylim() == (25.5, -0.5)  # the first layer on top
    assert {t.get_fontsize() for t in ax.get_yticklabels()} == {9} and not any(
        t.get_rotation() for t in ax.get_yticklabels())
    assert len({tuple(c) for c in dots.get_facecolors()}) == 1  # no findings: one colour
    png(fig)


def test_gradient_flow_colours_findings_and_shades_the_highlight(squeeze):
    *_, cap = squeeze
    findings = [Finding("vanishing_grad", "features.3"), Finding("exploding_grad", "classifier.1"),
                Finding("dead_relu", "features.4")]
    fig = plots.gradient_flow(replace(cap, findings=findings), highlight="features.4.expand3x3")
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    (dots,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    colours = [tuple(c) for c in dots.get_facecolors()]
    for name, colour in zip(names, colours):
        kind = ("vanishing_grad" if name.startswith("features.3.") else
                "exploding_grad" if name == "classifier.1" else "normal")
        assert colour == to_rgba(COLORS[kind]), name
    assert colours.count(to_rgba(COLORS["vanishing_grad"])) == 3  # the fire module's three convs
    (band,) = [p for p in ax.patches]
    x = names.index("features.4.expand3x3")
    assert (band.get_y(), band.get_y() + band.get_height()) == (x - 0.5, x + 0.5)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["gradient norm", "vanishing", "exploding"]
    png(fig)


def test_gradient_flow_marks_zero_missing_and_frozen_gradients():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # the ReLU outputs only zeros: layer 0 gets a zero gradient
    model[4].requires_grad_(False)
    cap = layerscope.capture(model, torch.randn(3, 4), target=torch.tensor([0, 1, 1]))
    fig = plots.gradient_flow(cap)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2", "3", "4"]
    normal, *marks = [c for c in ax.collections if isinstance(c, PathCollection)]
    # layer 2 sees only zeros, so its weight gradient is zero but its bias gradient is not
    expected = [math.hypot(*[v for v in cap[n].param_grad_norms.values()]) for n in ("2", "3")]
    np.testing.assert_allclose(normal.get_offsets()[:, 0], expected)
    assert cap["0"].param_grad_norms == {"weight": 0.0, "bias": 0.0}
    where = {t.get_text(): m.get_offsets()[:, 1].tolist()
             for t, m in zip(ax.get_legend().get_texts()[1:], marks)}
    assert where == {"zero gradient": [0], "frozen": [3]}
    png(fig)


def test_gradient_flow_thins_the_names_of_a_large_model_and_names_the_highlight():
    from torchvision.models import resnet50

    cap = layerscope.capture(resnet50(weights=None).eval(), torch.randn(1, 3, 64, 64))
    layers = [n for n, r in cap.modules.items() if r.num_own_params and r.calls]
    assert len(layers) == 107  # 53 convs, 53 batch norms and fc
    fig = plots.gradient_flow(cap, highlight="layer3.2")
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert 30 <= len(names) <= 48 and "layer3.2.conv1" in names and set(names) <= set(layers)
    rows = ax.get_yticks()
    inches = fig.get_size_inches()[1] * ax.get_position().height / len(layers)  # per layer row
    assert min(np.diff(rows)) * inches * 72 >= 9  # 9 pt names never overlap
    png(fig)


def test_gradient_flow_without_backward_says_so():
    cap = layerscope.capture(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), backward=False)
    fig = plots.gradient_flow(cap)
    assert [t.get_text() for t in fig.axes[0].texts] == ["no gradients were computed"]


def test_conv_filters_rgb_tiles_are_the_weights(squeeze):
    model, *_ = squeeze
    conv = model.features[0]  # 64 filters, 3 x 3 x 3
    fig = plots.conv_filters(conv)
    (shown,) = images(fig.axes[0])
    assert shown.shape == (4 * 4 - 1, 16 * 4 - 1, 4)  # 4 rows of 16 tiles, 1 pixel apart, RGBA
    w = conv.weight.detach().numpy()
    bound = np.abs(w).max()
    for i in (0, 17, 63):
        r, c = divmod(i, 16)
        tile = shown[4 * r : 4 * r + 3, 4 * c : 4 * c + 3]
        np.testing.assert_allclose(tile[..., :3], w[i].transpose(1, 2, 0) / (2 * bound) + 0.5, atol=1e-6)
        assert (tile[..., 3] == 1).all()
    assert (shown[3, :, 3] == 0).all()  # the gaps are transparent
    assert "64 of 64 filters (RGB)" in fig.axes[0].get_title(loc="left")
    png(fig)


def test_conv_filters_grey_tiles_per_filter_and_channel():
    conv = nn.Conv2d(2, 5, kernel_size=5)
    fig = plots.conv_filters(conv)
    (shown,) = [im for im in fig.axes[0].get_children() if isinstance(im, AxesImage)]
    found = tiles(shown.get_array().filled(np.nan))
    w = conv.weight.detach().numpy()
    assert len(found) == 10  # one row per filter, one column per input channel
    for k, tile in enumerate(found):
        np.testing.assert_allclose(tile, w[k // 2, k % 2], rtol=1e-6)
    bound = np.abs(w).max()
    np.testing.assert_allclose(shown.get_clim(), (-bound, bound))
    with pytest.raises(ValueError, match="4-D weight"):
        plots.conv_filters(nn.Linear(3, 3))


def _gaussian(h, w, cy, cx, s=12.0):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))


def test_cam_overlay_puts_the_brightest_spot_where_the_heatmap_peaks():
    img = torch.rand(3, 96, 128)
    normalised = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    heat = _gaussian(96, 128, 30, 90)
    fig = plots.cam_overlay(normalised, heat, MEAN, STD, alpha=0.6)
    left, right = fig.axes[:2]
    (original,) = images(left)
    np.testing.assert_allclose(original, img.permute(1, 2, 0).numpy(), atol=1e-6)  # un-normalised
    base, over = images(right)
    np.testing.assert_allclose(base, original)
    assert np.unravel_index(np.argmax(over), over.shape) == (30, 90)
    np.testing.assert_allclose(over, heat.numpy(), atol=1e-6)
    png(fig)


def test_cam_overlay_rendered_pixels_peak_at_the_heatmap_argmax():
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)  # [H, W, 3] 0-255: shown as mid-grey
    heat = _gaussian(16, 16, 4, 11, s=2.0)  # a CAM at layer resolution: resized to the image
    fig = plots.cam_overlay(flat, heat)
    left, right = fig.axes[:2]
    np.testing.assert_allclose(images(left)[0], 128 / 255)
    over = images(right)[1]
    assert over.shape == (64, 64)
    iy, ix = np.unravel_index(np.argmax(over), over.shape)
    assert abs(iy - (4 + 0.5) * 4 + 0.5) <= 1 and abs(ix - (11 + 0.5) * 4 + 0.5) <= 1
    pixels = rgba(fig)
    (x0, y0), (x1, y1) = right.get_window_extent().get_points()
    height = pixels.shape[0]
    region = pixels[int(height - y1) + 1 : int(height - y0) - 1, int(x0) + 1 : int(x1) - 1, :3]
    bright = region.mean(axis=-1)
    py, px = np.unravel_index(np.argmax(bright), bright.shape)
    dx, dy = right.transData.inverted().transform((int(x0) + 1 + px + 0.5, height - (int(height - y1) + 1 + py + 0.5)))
    assert abs(dx - ix) <= 2 and abs(dy - iy) <= 2
    assert bright.min() < 0.3 < 0.6 < bright.max()  # dark where the heatmap is 0, light at its peak


def test_attention_heatmap_cells_are_the_weights_of_each_head():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, num_heads=4, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        _, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)  # [2, 4, 6, 6]
    tokens = ["[CLS]", "the", "cat", "sat", "on", "mat"]
    fig = plots.attention_heatmap(weights, tokens=tokens)
    heads = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in heads] == [f"head {i}" for i in range(4)]
    vmax = float(weights[0].max())
    for i, ax in enumerate(heads):
        (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(6, 6), weights[0, i].numpy(), rtol=1e-6)
        assert mesh.get_clim() == pytest.approx((0, vmax))  # one colour scale for all heads
        assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in heads[0].get_yticklabels()] == tokens
    assert {t.get_text() for t in heads[1].get_yticklabels()} == {""}  # inner panels: no repeated labels
    png(fig)

    fig = plots.attention_heatmap(weights[1], head=2)
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(6, 6), weights[1, 2].numpy(), rtol=1e-6)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(i) for i in range(6)]

    fig = Figure()
    ax = fig.add_subfigure(fig.add_gridspec(1, 1)[0]).add_subplot()
    assert plots.attention_heatmap(weights, ax=ax) is fig  # into the caller's axes: the mean of the heads
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(6, 6), weights[0].mean(0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="head 4 does not exist"):
        plots.attention_heatmap(weights, head=4)


def test_attention_heatmap_thins_labels_of_long_sequences():
    weights = torch.softmax(torch.randn(1, 3, 65, 65), dim=-1)
    fig = plots.attention_heatmap(weights, head=0)
    ticks = fig.axes[0].get_xticks()
    np.testing.assert_array_equal(ticks, np.arange(0, 65, 3) + 0.5)


def test_attention_rollout_overlay_lights_the_most_relevant_patch():
    image = torch.rand(1, 3, 64, 64)
    relevance = torch.rand(2, 1 + 16) * 0.1
    relevance[0, 1 + 4 * 1 + 2] = 1.0  # patch row 1, column 2 of a 4 x 4 grid
    fig = plots.attention_rollout_overlay(image, relevance)
    _, over = images(fig.axes[1])
    assert over.shape == (64, 64) and 0.9 < over.max() <= 1 and over.min() >= 0  # bilinear from 4 x 4
    iy, ix = np.unravel_index(np.argmax(over), over.shape)
    assert 16 <= iy < 32 and 32 <= ix < 48
    np.testing.assert_allclose(images(fig.axes[0])[0], image[0].permute(1, 2, 0).numpy(), atol=1e-6)
    png(fig)
    with_registers = torch.cat([torch.zeros(1, 5), relevance[:1, 1:]], dim=1)  # class token + 4 registers
    fig = plots.attention_rollout_overlay(image, with_registers, grid=(4, 4))
    np.testing.assert_allclose(images(fig.axes[1])[1], over, atol=1e-6)
    with pytest.raises(ValueError, match="grid="):
        plots.attention_rollout_overlay(image, torch.rand(21))


def test_parameter_breakdown_bars_sum_to_the_total(squeeze):
    *_, cap = squeeze
    fig = plots.parameter_breakdown(cap)
    ax = fig.axes[0]
    bars = ax.patches
    assert [t.get_text() for t in ax.get_yticklabels()] == ["features", "classifier"]
    widths = [b.get_width() for b in bars]
    assert widths == [cap["features"].num_params, cap["classifier"].num_params]
    assert sum(widths) == cap.total_params == 1_235_496
    assert "1.24M total" in ax.get_title(loc="left")
    assert [t.get_text() for t in ax.texts] == [" 722K (58%)", " 513K (42%)"]
    png(fig)


class _Tagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))
        self.body = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 10))
        self.head = nn.Linear(10, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.body(x * self.scale)))


def test_parameter_breakdown_own_parameters_frozen_blocks_and_wrappers():
    model = _Tagged()
    model.body[0].requires_grad_(False)
    wrapped = nn.Sequential(model)  # a wrapper with a single child: its blocks are the model's
    cap = layerscope.capture(wrapped, torch.randn(2, 10), backward=False)
    fig = plots.parameter_breakdown(cap)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["(own)", "body", "head"]  # act has none
    trainable, frozen = ax.containers
    assert [b.get_width() for b in trainable] == [10, 210, 33]
    assert [b.get_width() for b in frozen] == [0, 220, 0]
    total = sum(p.numel() for p in model.parameters())
    assert sum(b.get_width() for b in ax.patches) == total == cap.total_params == 473
    assert "of 0" in ax.get_title(loc="left")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["trainable", "frozen"]


def test_parameter_breakdown_says_when_blocks_share_parameters():
    emb = nn.Embedding(50, 8)
    model = nn.Sequential(emb, nn.Linear(8, 50))
    model[1].weight = emb.weight  # tied: counted once in the total, in both blocks' bars
    cap = layerscope.capture(model, torch.tensor([[1, 2, 3]]), backward=False)
    fig = plots.parameter_breakdown(cap)
    widths = [b.get_width() for b in fig.axes[0].patches]
    assert widths == [400, 450] and cap.total_params == 450
    assert "bars sum to 850" in fig.axes[0].get_title(loc="left")


def test_plots_draw_into_the_callers_axes(squeeze):
    *_, cap = squeeze
    fig, axes = plt.subplots(1, 2)
    try:
        assert plots.activation_histogram(cap["features.0"].calls[0], ax=axes[0]) is fig
        assert plots.parameter_breakdown(cap, ax=axes[1]) is fig
        assert len(axes[0].patches) == 64 and len(axes[1].patches) == 2
        assert len(fig.axes) == 2
    finally:
        plt.close(fig)
