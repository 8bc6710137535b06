"""``python -m layerscope``: the command line (see ``layerscope --help``); with no arguments, the SqueezeNet demo."""

from .report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
