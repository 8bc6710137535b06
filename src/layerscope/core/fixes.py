"""What to try next, one short line per finding kind: ``Finding.fix`` takes its line from here when it is made.

Every kind a rule can produce has a line (tests/test_findings.py collects the kinds from the source and checks).
The line is advice for the usual cause; the finding's message holds the numbers that prove it.
"""

FIXES = {
    # a failed pass
    "shape_mismatch": "Try: print the shape that reached it (its panel shows the failed call's input) and make the "
                      "layer before it produce that size, or change this layer's in_features/in_channels to match.",
    "device_mismatch": "Try: move the model and the batch to one device: model.to(device) and batch.to(device).",
    "dtype_mismatch": "Try: give the model and the batch one dtype: model.float() and batch.float() (or .half() "
                      "for both).",
    "forward_error": "Try: run the failing module alone on the input its panel shows, and read torch's message in "
                     "the traceback (capture.error.traceback).",
    "loss_error": "Try: check what the loss gets: pass target= as class indices (N,) for logits (N, classes), or "
                  "give loss_fn=lambda output, batch: ... that returns one number.",
    "backward_error": "Try: look for an in-place operation (x += ..., ReLU(inplace=True)) on a tensor the backward "
                      "still needs, and replace it with an out-of-place one.",
    # NaN / Inf
    "input_nonfinite": "Try: find the bad rows with torch.isfinite(batch).all(dim=1), then drop or impute them.",
    "nan": "Try: look at this module's inputs and weights (its panel): lower the learning rate, clip the inputs of "
           "log/sqrt/division (e.g. x.clamp_min(1e-6)), or use a numerically safe op (log_softmax).",
    "inf": "Try: lower the initial weights or the learning rate, add normalisation before it, or compute in float32 "
           "instead of float16.",
    "nonfinite_loss": "Try: use F.cross_entropy on logits (not log of a softmax), check the target's range, and add "
                      "an epsilon to divisions and logs in loss_fn.",
    "nonfinite_grad": "Try: replace the op right after it that has no finite derivative at its input (sqrt(x) -> "
                      "sqrt(x + 1e-8), clamp before log), or clip gradients with clip_grad_norm_.",
    # the batch
    "input_range": "Try: normalise the batch, e.g. transforms.Normalize(mean, std) after ToTensor() (which divides "
                   "by 255).",
    # gradients
    "no_grad": "Try: remove the .detach() / torch.no_grad() / argmax at the cut point, or use a differentiable "
               "stand-in (softmax instead of argmax).",
    "zero_grad": "Try: check what multiplies its output by 0 or what kills the units after it (dead ReLUs: a lower "
                 "learning rate, LeakyReLU, or better initialisation).",
    "exploding_grad": "Try: lower the initial weights (nn.init.kaiming_normal_), add BatchNorm/LayerNorm, or clip "
                      "gradients with torch.nn.utils.clip_grad_norm_.",
    "vanishing_grad": "Try: add skip connections or normalisation, use ReLU instead of sigmoid/tanh, or initialise "
                      "with nn.init.kaiming_normal_.",
    "flat_loss": "Try: capture(model, batch, target=labels) or loss_fn=... so the gradients are those of a real loss.",
    # activations
    "dead_activation": "Try: a lower learning rate, LeakyReLU instead of ReLU, or BatchNorm before the ReLU.",
    "saturated_activation": "Try: normalise its inputs (BatchNorm/LayerNorm before it), lower the weights feeding it, "
                            "or use ReLU.",
    # the model's flags
    "frozen": "Try: if it should learn, set p.requires_grad_(True) for its parameters (and give them to the "
              "optimizer); if it is frozen on purpose, nothing to do.",
    "unused_module": "Try: call it in forward(), or delete it from __init__ if it is left over.",
    "train_mode": "Try: model.eval() before inspecting or evaluating (and model.train() again before training).",
    "compiled": "Try: nothing needed; to inspect the compiled graph itself, use torch._dynamo.explain.",
    "uninitialised": "Try: run model(batch) once before capturing, so lazy layers get their sizes.",
    "offloaded": "Try: load the model fully on one device (no device_map offload) to measure its gradients.",
    # costs
    "activation_memory": "Try: torch.utils.checkpoint.checkpoint(block, x) around it, or a smaller batch.",
    "unsupported_ops": "Try: nothing needed; read its FLOPs as a lower bound.",
    # a distributed job
    "rank_desync": "Try: make every rank run the same code path and start from the same weights (broadcast them, or "
                   "seed before building the model).",
    # a watched run (layerscope.watch)
    "loss_diverged": "Try: a learning rate 10 times lower, gradient clipping, or a warm-up.",
    "loss_flat": "Try: a higher learning rate, check that optimizer.step() runs and that the loss uses the outputs.",
    "grad_accumulating": "Try: call optimizer.zero_grad() once per step (before loss.backward()).",
    "update_too_large": "Try: a lower learning rate (updates near 1e-3 of the weights are typical).",
    "update_too_small": "Try: a higher learning rate, or check the layer is not frozen or its gradients vanishing.",
    "param_not_in_optimizer": "Try: build the optimizer from model.parameters() after adding every layer.",
    "eval_mode_training": "Try: call model.train() before the training loop (and model.eval() only to evaluate).",
    "dead_units_growing": "Try: a lower learning rate, LeakyReLU, or BatchNorm before the ReLU.",
}
