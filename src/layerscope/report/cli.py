"""The command line: ``layerscope MODULE:CALLABLE --input SHAPE`` captures a model and prints what it saw;
``layerscope show FILE.lsc`` does the same for a saved capture. Both can write the HTML report."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import sys
import textwrap

WIDTH = 100  # columns the output fits in
DEMO_MODEL, DEMO_INPUT = "torchvision.models:squeezenet1_1", "1,3,224,224"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EXAMPLES = f"""\
examples:
  layerscope torchvision.models:squeezenet1_1 --input 1,3,224,224 --html squeezenet.html
  layerscope torchvision.models:resnet18 --input 2,3,224,224 --target 3 --save resnet18.lsc
  layerscope my_models.py:build --input 8,16 --no-backward
  layerscope show resnet18.lsc --html resnet18.html
  layerscope                      (no model: the demo, {DEMO_MODEL} on --input {DEMO_INPUT})

MODEL is MODULE:CALLABLE. MODULE is an importable module (torchvision.models) or a .py file; CALLABLE is
called with no arguments and must return a torch.nn.Module (torchvision's models then have random
weights: weights=None is their default), or it is a Module already. The model is put in eval mode
(--train keeps training mode) and captured on random normal inputs of the given shapes, drawn from a
generator seeded with --seed.

Prints the findings first (or "no findings"), then one row per module: its calls, its first call's output
shape and statistics (mean, std, share of zeros), the gradient norm of that output, and its parameters.
Exit status: 0 when the capture ran, 1 when it failed (the error is printed and is in the files written),
2 when the command line is wrong, the model cannot be built, or the file cannot be read."""

SHOW_EXAMPLES = """\
examples:
  layerscope show squeezenet.lsc
  layerscope show squeezenet.lsc --html squeezenet.html

Exit status: 0 for a capture that ran, 1 for one that failed, 2 when the file cannot be read."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"a shape is positive integers separated by commas, like 1,3,224,224; "
                                         f"got {text!r}")
    return shape


def _outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--html", metavar="FILE", type=pathlib.Path,
                        help="write the report: one self-contained HTML file (open it in any browser, offline)")
    parser.add_argument("--summary", action="store_true", help="also print the torchinfo summary table")


def capture_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerscope", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Capture one forward and backward pass of a PyTorch model and print what every module saw: "
                    "the findings of the debugging checklist, then a compact table. "
                    "Run 'layerscope show --help' for saved captures.")
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help=f"MODULE:CALLABLE that builds the model, e.g. {DEMO_MODEL} (default: that demo)")
    parser.add_argument("--input", metavar="SHAPE", type=_shape, action="append",
                        help="shape of a random input, e.g. 1,3,224,224; repeat for a model that takes several "
                             "inputs (model(x, y))")
    parser.add_argument("--target", metavar="CLASS", type=int,
                        help="class index for a cross-entropy loss on the output logits (default: the loss is "
                             "the sum of the outputs)")
    parser.add_argument("--no-backward", action="store_true",
                        help="forward pass only: no loss, no gradients")
    parser.add_argument("--train", action="store_true", help="keep the model in training mode (default: eval)")
    parser.add_argument("--seed", metavar="N", type=int, default=0,
                        help="seed for the model's initial weights and the random input (default: 0)")
    parser.add_argument("--save", metavar="FILE", type=pathlib.Path,
                        help="write the capture to FILE (.lsc; 'layerscope show FILE' or layerscope.load reads it)")
    _outputs(parser)
    return parser


def show_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerscope show", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SHOW_EXAMPLES,
        description="Print the findings and the per-module table of a saved capture (a .lsc file from "
                    "'layerscope --save' or Capture.save), and write its report when asked.")
    parser.add_argument("capture", metavar="FILE", type=pathlib.Path, help="the saved capture (.lsc)")
    _outputs(parser)
    return parser


def build(spec: str):
    """The model MODULE:CALLABLE names: the callable called with no arguments, or the Module itself."""
    from torch import nn

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"MODEL must be MODULE:CALLABLE, e.g. {DEMO_MODEL}; got {spec!r}")
    if where.endswith(".py") or os.sep in where:
        path = pathlib.Path(where).resolve()
        if not path.is_file():
            raise ValueError(f"no such file: {where}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.parent))  # as `python file.py` would: its neighbours are importable
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise TypeError(f"{attr} is a {type(obj).__name__}, neither a callable nor a torch.nn.Module")
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{attr}() returned a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters in the middle: ('features.12.expand3x3_activation', 21) ->
    'features.1…activation'."""
    if len(text) <= width:
        return text
    if width < 2:
        return text[:width]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _fit(value: float | None, width: int, percent: bool = False) -> str:
    """A number in at most ``width`` characters, with as many significant digits as fit (up to 4)."""
    if value is None:
        return ""
    for digits in (4, 3, 2, 1):
        out = f"{value:.{max(digits - 3, 0)}%}" if percent else f"{value:.{digits}g}"
        if len(out) <= width:
            return out
    return "#" * width


# (title, the widest it gets, right-aligned); the module column takes what is left of WIDTH
COLUMNS = (("module", None, False), ("type", 14, False), ("calls", 5, True), ("output", 18, False),
           ("mean", 9, True), ("std", 8, True), ("zeros", 6, True), ("grad", 8, True), ("params", 7, True))


def table(cap) -> list[str]:
    """One line per module, at most WIDTH columns: names and shapes too long are shortened in the middle."""
    from ..core.records import human
    from ..widget import text

    cells = []
    for name, report in cap.modules.items():
        call = report.calls[0] if report.calls else None
        s = call.stats if call is not None else None
        cells.append([
            name or "(model)", report.type_name, str(len(report.calls)),
            "not called" if call is None else "failed" if call.failed else text.dims(call.output_shapes, sep="x"),
            _fit(s.mean, 9) if s else "", _fit(s.std, 8) if s else "",
            _fit(s.zero_fraction, 6, percent=True) if s else "",
            _fit(call.grad_output_norm, 8) if call is not None else "", human(report.num_params),
        ])
    widths = [max(len(title), *(len(row[i]) for row in cells)) for i, (title, _, _) in enumerate(COLUMNS)]
    for i, (_, most, _) in enumerate(COLUMNS):
        if most is not None:
            widths[i] = min(widths[i], most)
    widths[0] = max(6, min(widths[0], WIDTH - sum(widths[1:]) - (len(COLUMNS) - 1)))
    lines = []
    for row in [[title for title, _, _ in COLUMNS], *cells]:
        parts = [shorten(v, w).rjust(w) if right else shorten(v, w).ljust(w)
                 for v, w, (_, _, right) in zip(row, widths, COLUMNS)]
        lines.append(" ".join(parts).rstrip())
    return lines


def findings(cap) -> list[str]:
    """The capture's error and findings, worst first, wrapped to WIDTH columns."""
    from ..widget import text

    lines = []
    if cap.error is not None:
        lines += textwrap.wrap(f"{text.failed(cap.error)} {cap.error.message}", WIDTH)
    if not cap.findings:
        return lines + ["no findings"]
    counts = ", ".join(f"{sum(f.severity == s for f in cap.findings)} {s}" for s in ("error", "warning", "info"))
    lines.append(f"{len(cap.findings)} finding{'s' * (len(cap.findings) != 1)} ({counts}):")
    for f in cap.findings:
        lines += textwrap.wrap(f"{f.severity:<7}  {text.display_name(f.module)}: {f.message}", WIDTH,
                               initial_indent="  ", subsequent_indent=" " * 11)
        if f.fix:
            lines += textwrap.wrap(f.fix, WIDTH, initial_indent=" " * 11, subsequent_indent=" " * 11)
    return lines


def _print(text: str, out) -> None:
    """Print, and carry on when the reader has gone (``layerscope ... | head``): the files are still written."""
    try:
        print(text, file=out, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # so that the flush at exit is quiet too


def _say(line: str, out) -> None:
    _print(textwrap.fill(line, WIDTH, subsequent_indent="  "), out)


def report(cap, args, out) -> int:
    """Print what ``cap`` holds and write the files asked for; the exit status."""
    lines = findings(cap) + [""] + table(cap)
    called = sum(m.called for m in cap.modules.values())
    loss = f"; loss ({cap.loss_kind}) {cap.loss:.4g}" if cap.loss is not None else ""
    lines += ["", *textwrap.wrap(f"{len(cap.modules):,} modules ({called:,} called); {cap.total_params:,} "
                                 f"parameters ({cap.trainable_params:,} trainable){loss}", WIDTH)]
    if args.summary:
        lines += ["", cap.summary()]
    _print("\n".join(lines), out)
    if args.html is not None:
        cap.save_html(args.html)
        _say(f"wrote {args.html} ({args.html.stat().st_size / 1e6:.2f} MB)", out)
    if getattr(args, "save", None) is not None:
        cap.save(args.save)
        _say(f"wrote {args.save} ({args.save.stat().st_size / 1e6:.2f} MB)", out)
    return EXIT_FAILED if cap.error is not None else EXIT_OK


def _capture(args, parser, out) -> int:
    import torch

    from ..core import capture

    if args.model is None:
        args.model = DEMO_MODEL
        args.input = args.input or [_shape(DEMO_INPUT)]
        _say(f"No model given: the demo, {DEMO_MODEL} on --input {DEMO_INPUT} (layerscope --help for yours).",
             out)
    if not args.input:
        parser.error("--input SHAPE is needed with a model, e.g. --input 1,3,224,224")
    torch.manual_seed(args.seed)
    try:
        model = build(args.model)
    except Exception as exc:  # noqa: BLE001 - any failure to import or build: say so, exit 2
        print(f"layerscope: could not build the model {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    model.train(args.train)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = [torch.randn(shape, generator=generator) for shape in args.input]
    batch = inputs[0] if len(inputs) == 1 else tuple(inputs)
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    _say(f"{type(model).__name__} from {args.model}, input {shapes}, seed {args.seed}, "
         f"{'training' if args.train else 'eval'} mode", out)
    cap = capture(model, batch, target=args.target, backward=not args.no_backward)
    return report(cap, args, out)


def _show(args, out) -> int:
    from ..core import FormatError, load

    try:
        cap = load(args.capture)
    except (OSError, FormatError) as exc:
        print(f"layerscope show: cannot read {args.capture}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _say(f"{cap.modules[''].type_name} from {args.capture}", out)
    return report(cap, args, out)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["show"]:
        return _show(show_parser().parse_args(argv[1:]), sys.stdout)
    parser = capture_parser()
    return _capture(parser.parse_args(argv), parser, sys.stdout)
