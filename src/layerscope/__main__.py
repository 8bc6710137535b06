"""`python -m layerscope`: capture SqueezeNet 1.1 on a random batch and print what it saw."""

from __future__ import annotations

import torch

from . import capture


def main() -> None:
    from torchvision.models import squeezenet1_1

    torch.manual_seed(0)
    model = squeezenet1_1(weights=None).eval()
    cap = capture(model, torch.randn(2, 3, 224, 224))
    print(cap.summary())
    print(f"\n{'module':<24} {'type':<18} {'output':<20} {'mean':>8} {'std':>8} {'zeros':>6} {'grad':>9}")
    for name, call in cap.calls:
        s = call.stats
        grad = f"{call.grad_output_norm:9.3g}" if call.grad_output_norm is not None else " " * 9
        print(f"{name or '<root>':<24} {cap[name].type_name:<18} {str(call.output_shapes):<20} "
              f"{s.mean:8.3f} {s.std:8.3f} {s.zero_fraction:6.1%} {grad}")
    print(f"\n{cap.total_params:,} parameters; loss ({cap.loss_kind}) = {cap.loss:.4g}; error: {cap.error}")


if __name__ == "__main__":
    main()
