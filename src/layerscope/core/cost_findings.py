"""The checklist's cost answers, from the records alone: where the activation memory sits (a checkpointing
candidate) and which ops make the FLOP counts a lower bound."""

from __future__ import annotations

from .diagnose import label
from .records import Capture, Finding, human, human_bytes


def activation_memory(cap: Capture, share: float, floor: int = 0) -> list[Finding]:
    """The innermost module (not the model itself) holding more than ``share`` of the bytes saved for the backward,
    when the pass saves at least ``floor`` bytes."""
    total = cap.activation_bytes
    if not total or total < floor:
        return []
    held = [r for name, r in cap.modules.items() if name and (r.activation_bytes or 0) > share * total]
    if not held:
        return []
    report = max(held, key=lambda r: r.depth)
    part = report.activation_bytes / total
    blocks = [c for c in report.children if cap[c].activation_bytes]
    each = f" (or each of its {len(blocks)} blocks)" if "sequential" in report.traits or \
        report.type_name == "ModuleList" and len(blocks) > 1 else ""
    again = f" ({human(report.flops)} FLOPs)" if report.flops else ""
    message = (f"{label(report.name, report.type_name)} holds {part:.0%} of the memory saved for the backward "
               f"({human_bytes(report.activation_bytes)} of {human_bytes(total)}): wrapping it{each} in "
               f"torch.utils.checkpoint would free that memory for the cost of running its forward again{again}.")
    details = {"activation_bytes": report.activation_bytes, "total_bytes": total, "share": part,
               "flops": report.flops}
    return [Finding("activation_memory", "info", report.name, message, details)]


def unsupported_ops(cap: Capture) -> list[Finding]:
    """One finding per aten op that ran with no FLOP formula, on the innermost module around every place it ran."""
    if cap.flops is None:
        return []
    found = []
    for op in sorted({op for r in cap.modules.values() for op in r.unsupported_ops}):
        where = [n for n, r in cap.modules.items()
                 if op in r.unsupported_ops and not any(op in cap[c].unsupported_ops for c in r.children)]
        parts = [n.split(".") for n in where if n]
        common = []
        if len(parts) == len(where):  # none of them is the model itself
            for step in zip(*parts):
                if len(set(step)) > 1:
                    break
                common.append(step[0])
        name = ".".join(common)
        report = cap[name]
        listed = ", ".join(where[:3]) + (", ..." if len(where) > 3 else "")
        runs = f"{label(name, report.type_name)} runs" if where == [name] else \
            f"{len(where)} modules in {label(name, report.type_name)} ({listed}) run"
        message = (f"{runs} {op}, which has no FLOP formula: it counts as 0, so the FLOPs of "
                   f"{'it' if where == [name] else 'them'} and of every module around are a lower bound.")
        found.append(Finding("unsupported_ops", "info", name, message, {"op": op, "modules": where}))
    return found
