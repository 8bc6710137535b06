"""Models nobody here wrote: Hugging Face transformers and timm built from small configs with random weights
(no download), torchvision detection, segmentation and optical flow, and the module features real code uses
(meta and lazy parameters, torch.compile, buffers reassigned in forward, reentrant checkpointing, accelerate's
offload hooks). Everything is checked against plain torch: parameter totals, outputs bit for bit, the model's
state, gradient norms against loss.backward(), attention against the model's own eager weights."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerscope import attention_maps, capture, grad_cam
from layerscope.core.nested import iter_tensors
from layerscope.core.rerun import module_output
from models import Boom, no_hooks_left

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# -- what must be left as it was, and what plain torch says --------------------------------------------------


def state(model: nn.Module) -> dict:
    """Everything capture must put back: flags, requires_grad, the .grad objects and values, every buffer
    (the very tensor each module attribute holds, and its values), and the hooks."""
    return dict(
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        grads=[(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        buffers=[(m, k, b, b.clone()) for m in model.modules() for k, b in m._buffers.items() if b is not None],
        hooks=[(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for (g, _), (g0, v0) in zip(after["grads"], before["grads"]):
        assert g is g0 and (g is None or torch.equal(g, v0))
    for m, k, b, v in before["buffers"]:
        assert m._buffers[k] is b, k
        assert torch.equal(b, v) if not b.is_meta else b.is_meta, k
    assert after["hooks"] == before["hooks"]  # Hugging Face models keep hooks of their own: the same ones


def assert_same_tensors(got, expected) -> None:
    """Every tensor of two nested outputs equal bit for bit, in order; none of ``got``'s needs a gradient."""
    a, b = list(iter_tensors(got)), list(iter_tensors(expected))
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert not x.requires_grad
        assert x.shape == y.shape and torch.equal(x, y.detach())


def assert_grad_norms(cap, model: nn.Module, loss: torch.Tensor) -> None:
    """The gradient norms capture recorded equal those of a plain loss.backward() (run here, after capture)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    compared = 0
    for name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            got = cap[name].params[local].grad_norm
            if p.grad is None:
                assert got is None, f"{name}.{local}"
            else:
                assert got == pytest.approx(float(p.grad.double().norm()), rel=1e-5, abs=1e-12), f"{name}.{local}"
                compared += 1
    assert compared
    model.zero_grad(set_to_none=True)


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- Hugging Face: eight architectures from small configs ----------------------------------------------------


def _ids(n=2, length=7, vocab=100):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (n, length), generator=g)


def hf_model(kind: str):
    """(model in eval mode, batch with labels), from a config small enough to run in a fraction of a second."""
    T, ids = transformers, _ids()
    torch.manual_seed(0)
    if kind == "gpt2":
        config = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
                              eos_token_id=0)
        return T.GPT2LMHeadModel(config).eval(), {"input_ids": ids, "labels": ids}
    if kind == "bert":
        config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              vocab_size=100, max_position_embeddings=32)
        mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
        return T.BertForMaskedLM(config).eval(), {"input_ids": ids, "attention_mask": mask, "labels": ids}
    if kind == "llama":
        config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
        return T.LlamaForCausalLM(config).eval(), {"input_ids": ids, "labels": ids}
    if kind == "t5":
        config = T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                            vocab_size=100, decoder_start_token_id=0, pad_token_id=0)
        return T.T5ForConditionalGeneration(config).eval(), {"input_ids": ids, "labels": ids[:, :5].clone()}
    if kind == "bart":
        config = T.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                              max_position_embeddings=32)
        return T.BartForConditionalGeneration(config).eval(), {"input_ids": ids, "labels": ids[:, :5].clone()}
    if kind == "vit":
        config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8, num_labels=3)
        return T.ViTForImageClassification(config).eval(), {"pixel_values": torch.randn(2, 3, 32, 32),
                                                             "labels": torch.tensor([0, 2])}
    if kind == "whisper":
        config = T.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                 num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                                 bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
        return T.WhisperForConditionalGeneration(config).eval(), {"input_features": torch.randn(2, 8, 32),
                                                                  "labels": ids[:, :4].clone()}
    if kind == "wav2vec2":
        config = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=12,
                                  pad_token_id=0)
        labels = torch.randint(1, 12, (2, 4), generator=torch.Generator().manual_seed(2))
        return T.Wav2Vec2ForCTC(config).eval(), {"input_values": torch.randn(2, 400), "labels": labels}
    raise ValueError(kind)


HF_KINDS = ["gpt2", "bert", "llama", "t5", "bart", "vit", "whisper", "wav2vec2"]
ATTENTION_LAYERS = {"gpt2": 2, "bert": 2, "llama": 2, "t5": 3, "bart": 3, "vit": 2, "whisper": 3, "wav2vec2": 2}


def _attentions(out) -> list[torch.Tensor]:
    """The model's own eager weights in the order its layers run (encoder, then decoder self and cross)."""
    keys = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
    return [a for key in keys if out.get(key) is not None for a in out[key]]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hugging_face_model_capture_against_plain_torch(kind):
    model, batch = hf_model(kind)
    reference = model(**batch)  # a plain run: grad enabled as in capture
    before = state(model)
    cap = capture(model, batch)
    assert cap.error is None, cap.error
    assert cap.loss_kind == "model_loss" and cap.loss == float(reference.loss)
    assert cap.total_params == numel(model) == cap[""].num_params
    assert_same_tensors(cap.output, reference)  # the cache too, detached all the way down
    assert type(cap.output) is type(reference)
    assert_unchanged(model, before)
    assert not [f for f in cap.findings if f.kind in ("no_grad", "compiled", "uninitialised")]
    assert_grad_norms(cap, model, model(**batch).loss)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hugging_face_attention_under_sdpa_and_eager_equals_output_attentions(kind):
    model, batch = hf_model(kind)
    del batch["labels"]
    if kind in ("t5", "bart"):
        batch["decoder_input_ids"] = _ids(length=5)
    if kind == "whisper":
        batch["decoder_input_ids"] = _ids(length=4)
    assert model.config._attn_implementation == "sdpa"
    config = copy.deepcopy(model.config.to_dict())
    with torch.no_grad():
        plain = model(**batch)
    before = state(model)
    under_sdpa = attention_maps(model, batch)
    assert model.config.to_dict() == config and model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    under_eager = attention_maps(model, batch)
    assert_unchanged(model, before)
    with torch.no_grad():
        own = _attentions(model(**batch, output_attentions=True))
    assert len(under_sdpa) == len(under_eager) == len(own) == ATTENTION_LAYERS[kind]
    assert list(under_sdpa) == list(under_eager)
    for (name, got), expected, eager in zip(under_sdpa.items(), own, under_eager.values()):
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(eager, expected, atol=0, rtol=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert_same_tensors(model(**batch), plain)


def test_a_kernel_that_keeps_no_weights_runs_eager_for_the_pass_and_the_config_is_put_back():
    """A registered attention function (as flash attention is) gives no weights: the pass runs eager."""
    def hidden(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask=attention_mask,
                                                                 is_causal=attention_mask is None, scale=scaling)[0]
        return out.transpose(1, 2).contiguous(), None

    transformers.AttentionInterface.register("layerscope_test_kernel", hidden)
    model, batch = hf_model("llama")
    del batch["labels"]
    with torch.no_grad():
        plain = model(**batch).logits
    model.set_attn_implementation("layerscope_test_kernel")
    config = copy.deepcopy(model.config.__dict__)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain, atol=1e-5, rtol=1e-5)  # the kernel is right
    maps = attention_maps(model, batch)
    assert model.config.__dict__ == config
    model.set_attn_implementation("eager")
    with torch.no_grad():
        own = model(**batch, output_attentions=True).attentions
    assert len(maps) == 2
    for got, expected in zip(maps.values(), own):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_sum_of_outputs_leaves_out_the_cache_and_integers():
    model, batch = hf_model("gpt2")
    del batch["labels"]
    cap = capture(model, batch)
    reference = model(**batch)
    assert cap.loss_kind == "sum" and cap.output_numel == reference.logits.numel()
    assert cap.loss == pytest.approx(float(reference.logits.double().sum()), rel=1e-5)
    assert_grad_norms(cap, model, model(**batch).logits.sum())


def test_own_loss_fn_and_gradient_checkpointing_with_reentrant_backward():
    model, batch = hf_model("llama")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    before = state(model)
    loss_fn = lambda out, b: F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten())
    cap = capture(model, batch, loss_fn=loss_fn)
    assert cap.error is None and cap.loss_kind == "loss_fn"
    assert not [f for f in cap.findings if f.kind in ("no_grad", "zero_grad")]
    assert_unchanged(model, before)
    assert_grad_norms(cap, model, loss_fn(model(**batch), batch))


def test_init_empty_weights_model_is_a_meta_model():
    accelerate = pytest.importorskip("accelerate")
    model, batch = hf_model("llama")
    with accelerate.init_empty_weights():
        empty = type(model)(model.config)
    assert all(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
    before = state(empty)
    cap = capture(empty, batch)
    assert cap.error is None and cap.meta and not cap.backward
    assert cap.total_params == numel(model) == numel(empty)
    assert cap["model.layers.1.mlp.down_proj"].calls[0].output_shapes == (2, 7, 32)
    assert_unchanged(empty, before)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "the", "cat", "sat", "<b>on</b>", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_inspector_labels_attention_with_decoded_tokens_and_takes_loss_fn():
    from layerscope.widget import ModelInspector
    from layerscope.widget.inspector import EXPLAIN

    tok = _tokenizer()
    batch = dict(tok(["the cat sat <b>on</b> the mat", "a dog sat"], padding=True, return_tensors="pt"))
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=len(tok), max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    loss_fn = lambda out, b: out.last_hidden_state.pow(2).mean()
    inspector = ModelInspector(model, batch, tokenizer=tok, loss_fn=loss_fn)
    inspector.tree._handle_custom_msg({"event": "shown"}, [])
    assert inspector.capture.loss_kind == "loss_fn" and inspector.capture.error is None
    inspector.select("encoder.layer.0.attention.self")
    inspector._tabs.selected_index = EXPLAIN
    assert inspector._ex_image.value[:4] == b"\x89PNG"
    assert inspector._tokens(0, (6, 6)) == ["the", "cat", "sat", "<b>on</b>", "the", "mat"]
    assert inspector._tokens(1, (6, 6)) == ["a", "dog", "sat", "[PAD]", "[PAD]", "[PAD]"]
    assert inspector._tokens(0, (5, 6)) is None  # a map over other positions gets index labels


# -- timm -----------------------------------------------------------------------------------------------------


TIMM = {
    "convnext": ("convnext_atto", dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), 64),
    "efficientnet": ("test_efficientnet", {}, 64),
    "deit": ("deit_tiny_patch16_224", dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1), num_heads=(1, 2), img_size=56,
                                                  window_size=7), 56),
}


def timm_model(kind: str):
    name, kwargs, size = TIMM[kind]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval(), torch.randn(2, 3, size, size)


@pytest.mark.parametrize("kind", list(TIMM))
def test_timm_model_capture_against_plain_torch(kind):
    model, x = timm_model(kind)
    target = torch.tensor([1, 4])
    reference = model(x)
    before = state(model)
    cap = capture(model, x, target=target)
    assert cap.error is None and cap.loss_kind == "cross_entropy"
    assert cap.loss == pytest.approx(float(F.cross_entropy(reference, target)), rel=1e-6)
    assert cap.total_params == numel(model)
    assert_same_tensors(cap.output, reference)
    assert_unchanged(model, before)
    assert_grad_norms(cap, model, F.cross_entropy(model(x), target))
    result = grad_cam(model, x, target=target)
    assert result.task == "classification" and result.heatmap.shape == (2, *x.shape[-2:])
    assert_unchanged(model, before)


def test_timm_training_mode_buffers_restored():
    model, x = timm_model("efficientnet")
    model.train()
    before = state(model)
    cap = capture(model, x)
    assert cap.error is None
    assert_unchanged(model, before)


def _timm_attention(model):
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


@pytest.mark.parametrize("kind", ["deit", "swin"])
def test_timm_attention_the_same_through_sdpa_and_through_softmax(kind):
    model, x = timm_model(kind)
    with torch.no_grad():
        plain = model(x)
    fused_by_default = [m.fused_attn for m in _timm_attention(model)]
    for m in _timm_attention(model):
        m.fused_attn = True
    fused = attention_maps(model, x)
    for m in _timm_attention(model):
        m.fused_attn = False
    by_hand = attention_maps(model, x)
    assert list(fused) == list(by_hand) and len(fused) == 2
    for name, weights in fused.items():
        torch.testing.assert_close(weights, by_hand[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:-1]))
    if kind == "swin":  # windows of 7 x 7 folded into the batch: 2 images x 4 windows, then 2 x 1
        assert fused["layers.0.blocks.0.attn"].shape == (8, 1, 49, 49)
        assert fused["layers.1.blocks.0.attn"].shape == (2, 2, 49, 49)
    for m, fused in zip(_timm_attention(model), fused_by_default):
        m.fused_attn = fused
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    assert no_hooks_left(model)


class _HandAttention(nn.Module):
    """Attention as users write it: einsum logits, a mask, softmax, dropout, einsum with the values."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.qkv, self.drop = heads, nn.Linear(dim, 3 * dim), nn.Dropout(0.1)

    def forward(self, x, mask):
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).unbind(2)
        logits = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(dim // self.heads)
        weights = self.drop(logits.masked_fill(~mask[:, None, None, :], -math.inf).softmax(dim=-1))
        return torch.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, dim)


def test_hand_written_attention_weights_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.attn = _HandAttention()
    model.eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    maps = attention_maps(model.attn, {"x": x, "mask": mask})
    assert list(maps) == [""]
    with torch.no_grad():
        q, k, _ = model.attn.qkv(x).reshape(2, 5, 3, 2, 4).unbind(2)
    logits = np.einsum("nqhd,nkhd->nhqk", q.double().numpy(), k.double().numpy()) / 2.0
    logits[~mask.numpy()[:, None, None, :].repeat(2, 1).repeat(5, 2)] = -np.inf
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(maps[""].numpy(), expected, rtol=1e-5, atol=1e-6)


# -- torchvision: detection, segmentation, optical flow ---------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64,
                                              max_size=80, box_score_thresh=0.0, rpn_post_nms_top_n_test=100,
                                              box_detections_per_img=20).eval()
    nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.5)  # scores that differ between boxes
    return model, ([torch.rand(3, 64, 80), torch.rand(3, 64, 80)],)


def _by_hand(model, batch, layer: str, score) -> torch.Tensor:
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: kept.setdefault("a", out))
    try:
        out = model(*batch)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(score(out).sum(), kept["a"])
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * kept["a"]).sum(dim=1)).detach()


@pytest.mark.slow
def test_faster_rcnn_capture_and_grad_cam_of_a_box_score(detector):
    model, batch = detector
    reference = model(*batch)
    before = state(model)
    cap = capture(model, batch)
    assert cap.error is None and cap.total_params == numel(model)
    assert_same_tensors(cap.output, reference)
    assert_unchanged(model, before)

    top = grad_cam(model, batch)
    assert top.task == "detection"
    assert top.target.tolist() == [int(r["scores"].argmax()) for r in reference]
    torch.testing.assert_close(top.scores, torch.stack([r["scores"].max() for r in reference]).detach())
    torch.testing.assert_close(top.boxes, torch.stack([r["boxes"][t] for r, t in zip(reference, top.target)]).detach())
    assert top.layer.startswith("backbone.")
    expected = _by_hand(model, batch, top.layer, lambda out: torch.stack([o["scores"].max() for o in out]))
    torch.testing.assert_close(top.raw, expected, atol=1e-6, rtol=1e-4)

    chosen = grad_cam(model, batch, target=[3, 5], layer="backbone.body.12")
    assert chosen.target.tolist() == [3, 5] and chosen.layer == "backbone.body.12" and chosen.raw.shape[0] == 2
    picked = torch.stack([reference[0]["scores"][3], reference[1]["scores"][5]]).detach()
    torch.testing.assert_close(chosen.scores, picked)
    with pytest.raises(ValueError, match="box 500 of image 0, which has 20 boxes"):
        grad_cam(model, batch, target=500)
    assert_unchanged(model, before)


@pytest.mark.slow
def test_deeplab_grad_cam_of_a_class_mask_matches_pytorch_grad_cam():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    before = state(model)
    cap = capture(model, x)
    assert cap.error is None and cap.total_params == numel(model)
    result = grad_cam(model, x, target=2)
    assert result.task == "segmentation" and result.layer == "classifier.3"  # before the class maps
    assert result.heatmap.shape == (2, 64, 64)
    with torch.no_grad():
        out = model(x)["out"]
    masks = (out.argmax(dim=1) == 2).float()
    torch.testing.assert_close(result.scores, (out[:, 2] * masks).sum(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    auto = grad_cam(model, x)  # each item's most frequent class
    assert auto.target.tolist() == [int(torch.bincount(p.flatten(), minlength=4).argmax()) for p in out.argmax(1)]

    class Out(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    peer_model = Out(copy.deepcopy(model))
    with GradCAM(peer_model, [peer_model.model.classifier[3]]) as peer:
        for i in range(2):
            peer_map = peer(x[i:i + 1], targets=[SemanticSegmentationTarget(2, masks[i].numpy())])[0]
            if masks[i].any():
                corr = np.corrcoef(result.heatmap[i].numpy().ravel(), peer_map.ravel())[0, 1]
                assert corr > 0.99
    assert_unchanged(model, before)


@pytest.mark.slow
def test_raft_capture_and_a_clear_message_for_outputs_grad_cam_cannot_read():
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    model = raft_small(weights=None).eval()
    batch = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128), 2)
    reference = model(*batch)
    before = state(model)
    cap = capture(model, batch)
    assert cap.error is None and cap.total_params == numel(model)
    assert_same_tensors(cap.output, reference)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"returns a list of 2 .*Pass score_fn="):
        grad_cam(model, batch)
    flow = grad_cam(model, batch, score_fn=lambda flows: flows[-1].abs().mean(dim=(1, 2, 3)))
    assert flow.task == "score_fn" and flow.target.tolist() == [-1]
    assert_unchanged(model, before)


# -- module features real code uses -------------------------------------------------------------------------


def test_parameters_on_meta_with_real_buffers_are_a_meta_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[1].register_buffer("running_mean", torch.zeros(8))
    model[1].register_buffer("running_var", torch.ones(8))
    model[1].register_buffer("num_batches_tracked", torch.tensor(0))
    model.train()
    before = state(model)
    cap = capture(model, torch.randn(3, 4))
    assert cap.error is None and cap.meta and cap.total_params == 4 * 8 + 8 + 16 + 8 * 2 + 2
    assert cap["2"].calls[0].output_shapes == (3, 2)
    assert_unchanged(model, before)
    assert not model[1].running_mean.is_meta


class _LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.spare = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.LazyLinear(2)), nn.LazyLinear(3)

    def forward(self, x):
        return self.body(x)


def test_lazy_modules_are_counted_after_the_pass_and_an_uncalled_one_is_reported():
    model = _LazyNet()
    cap = capture(model, torch.randn(3, 5))
    assert cap.error is None
    assert cap.total_params == numel(model.body) == 5 * 6 + 6 + 6 * 2 + 2
    assert cap["body.0"].num_params == 36 and cap["spare"].num_params == 0
    [finding] = [f for f in cap.findings if f.kind == "uninitialised"]
    assert finding.module == "spare" and "lazy" in finding.message
    assert cap["body.0"].params["weight"].grad_norm > 0
    failing = _LazyNet()
    failing.body.insert(1, Boom())  # fails after the first lazy layer got its size, before the second
    cap = capture(failing, torch.randn(3, 5))
    assert cap.error is not None and cap.error.module == "body.1"
    assert cap.total_params == 5 * 6 + 6 and cap["body.3"].num_params == 0
    assert {m for f in cap.findings if f.kind == "uninitialised" for m in f.modules} == {"body.3", "spare"}


class _NoLen(nn.Module):
    """A module whose truthiness raises, as some real ones do."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)])

    def __len__(self):
        raise TypeError(f"{type(self).__name__} does not support len()")

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_compiled_model_that_already_ran_is_recorded_through_its_original_module():
    torch.manual_seed(0)
    model = _NoLen()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 4)
    reference = compiled(x)
    before = state(model)
    cap = capture(compiled, x)
    assert cap.error is None and cap.compiled
    assert list(cap.modules) == [name for name, _ in model.named_modules()]
    assert all(len(cap[name].calls) == (name != "layers") for name in cap.modules)  # a ModuleList is not called
    assert [f.kind for f in cap.findings] == ["compiled"]
    assert torch.equal(cap.output, reference.detach())
    assert "could not summarise" not in cap.summary()
    assert_unchanged(model, before)
    assert no_hooks_left(compiled)
    assert attention_maps(compiled, x) == {}
    assert_grad_norms(cap, model, model(x).sum())


class _Running(nn.Module):
    """Keeps a running mean by assigning a new tensor to its buffer, as real code does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("running", torch.zeros(4))

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            self.running = self.running * 0.9 + y.detach().mean(dim=0) * 0.1
        return y


def test_a_buffer_reassigned_in_forward_is_put_back():
    model = _Running().train()
    before = state(model)
    capture(model, torch.randn(3, 4))
    attention_maps(model, torch.randn(3, 4))
    module_output(model, torch.randn(3, 4), "fc")
    assert_unchanged(model, before)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.a, self.block, self.c = nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.c(checkpoint(self.block, self.a(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_blocks_get_the_gradients_of_a_plain_backward(reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(reentrant)
    model.block[0].weight.grad = torch.full((8, 8), 3.0)  # kept as it was, object and values
    x = torch.randn(5, 4, requires_grad=True)
    before = state(model)
    cap = capture(model, (x,), target=torch.tensor([0, 1, 1, 0, 1]))
    assert cap.error is None
    assert not [f for f in cap.findings if f.kind in ("no_grad", "zero_grad")]
    assert_unchanged(model, before)
    assert x.grad is None
    assert_grad_norms(cap, model, F.cross_entropy(model(x), torch.tensor([0, 1, 1, 0, 1])))


def _offload_models(tmp_path):
    accelerate = pytest.importorskip("accelerate")

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()

    cpu, disk, mapped = make(), make(), make()
    accelerate.cpu_offload(cpu, execution_device="cpu")
    accelerate.disk_offload(disk, str(tmp_path / "disk"), execution_device="cpu")
    mapped = accelerate.dispatch_model(mapped, device_map={"0": "cpu", "1": "cpu", "2": "disk", "3": "cpu"},
                                       offload_dir=str(tmp_path / "mapped"))
    return make(), {"cpu_offload": cpu, "disk_offload": disk, "device_map": mapped}


def test_accelerate_dispatch_hooks_are_kept_and_capture_works_through_them(tmp_path):
    plain, models = _offload_models(tmp_path)
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = plain(x)
    for how, model in models.items():
        hooked = {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")}
        forwards = {name: m.forward for name, m in model.named_modules() if hasattr(m, "_hf_hook")}
        assert hooked, how
        before = state(model)
        cap = capture(model, x)
        assert cap.error is None and not cap.meta, how
        assert torch.equal(cap.output, expected), how
        assert cap.total_params == numel(plain)
        assert cap.backward == (how == "device_map")  # there, the first and last layers stay in place
        for name, module in plain.named_modules():
            for local, p in module.named_parameters(recurse=False):
                record = cap[name].params[local]
                assert record.offloaded == (how != "device_map" or name == "2"), (how, name)
                if cap.backward:  # norms are taken for a backward: offloaded ones from the values kept
                    assert record.norm == pytest.approx(float(p.detach().double().norm()), rel=1e-6), (how, name)
        kinds = [f.kind for f in cap.findings]
        assert "offloaded" in kinds and "no_grad" not in kinds, (how, kinds)
        assert {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")} == hooked
        assert {name: m.forward for name, m in model.named_modules() if hasattr(m, "_hf_hook")} == forwards
        assert_unchanged(model, before)
        assert torch.equal(model(x), expected)


def test_new_record_fields_survive_save_and_load(tmp_path):
    from test_records import round_trip, same

    plain, models = _offload_models(tmp_path)
    for cap in (capture(models["cpu_offload"], torch.randn(3, 4)), capture(_LazyNet(), torch.randn(3, 5)),
                capture(torch.compile(_NoLen(), backend="eager"), torch.randn(3, 4))):
        same(cap, round_trip(cap, tmp_path))


class _Refuses:
    """An output object that cannot be copied."""

    def __init__(self, t):
        self.t = t

    def __reduce_ex__(self, protocol):
        raise TypeError("no copies")


class _OddOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x), _Refuses(self.fc(x))


def test_an_output_object_that_refuses_copies_is_passed_on_and_capture_does_not_raise():
    cap = capture(_OddOutput(), torch.randn(2, 3))
    assert cap.error is None and not cap.output[0].requires_grad
    assert isinstance(cap.output[1], _Refuses)
