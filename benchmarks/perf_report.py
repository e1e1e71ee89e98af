"""Result rows of ``benchmarks/perf.py`` and what is made of them: the common fields of a row, the text table (also
streamed row by row while the run goes) and its Markdown form, and the targets of issues 8 and 18 (speed, memory and
MFU of our methods against PEFT and the frozen-model floor) checked from whatever rows exist.
"""

from __future__ import annotations

from perf_models import ModelSpec

COLUMNS = ("section", "model", "method", "shape", "gc", "tokens/s", "step ms", "peak GiB", "MFU", "status")


def _fmt_row(row: dict) -> list[str]:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    status = row.get("status", "?")
    if status != "ok":
        status = f"{status}: {row.get('reason', '')}"[:90]
    elif row.get("note"):
        status = f"ok ({row['note']})"[:90]
    return [row.get("section", ""), row.get("model", ""), row.get("method", ""), row.get("shape", ""),
            "y" if row.get("gradient_checkpointing") else "", num(row.get("tokens_per_s"), ",.0f"),
            num(row.get("step_ms"), ".2f"), num(row.get("peak_gib"), ".2f"),
            "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%", status]


_STREAM_WIDTHS = (9, 13, 11, 9, 2, 9, 9, 8, 6)  # rows printed one by one while the run goes


def format_table(rows: list[dict], widths: tuple[int, ...] | None = None) -> str:
    """Fixed-width text table of result rows (column widths from the rows unless given)."""
    cells = [list(COLUMNS)] + [_fmt_row(r) for r in rows]
    widths = widths or tuple(max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1))
    lines = []
    for c in cells:
        lines.append("  ".join(c[i].ljust(widths[i]) if i < 4 else c[i].rjust(widths[i])
                               for i in range(len(COLUMNS) - 1)) + "  " + c[-1])
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """The same table in Markdown."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "/") for c in _fmt_row(r)) + " |")
    return "\n".join(out)


def _base_row(spec: ModelSpec, method: str, b: int, s: int, gc_on: bool) -> dict:
    return {"model": spec.name, "method": method, "shape": f"{b}x{s}", "gradient_checkpointing": gc_on}


# ---------------------------------------------------------------------------------------------------------------
# Targets of issue 8, checked from the rows
# ---------------------------------------------------------------------------------------------------------------
def _find(rows: list[dict], **kw) -> dict | None:
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(rows: list[dict]) -> list[dict]:
    """The comparisons issue 8 asks for, from whatever rows exist (ratios > 1 mean "ours is faster/smaller")."""
    out: list[dict] = []
    train = [r for r in rows if r.get("section") == "train"]
    for model in sorted({r["model"] for r in train}):
        for shape in sorted({r["shape"] for r in train if r["model"] == model}):
            ours = _find(train, model=model, shape=shape, method="prefix")
            peft = _find(train, model=model, shape=shape, method="peft_prefix")
            if ours and peft:
                need = 1.3 if int(shape.split("x")[1]) >= 2048 else 1.0
                speed = ours["tokens_per_s"] / peft["tokens_per_s"]
                item = {"target": f"prefix vs PEFT prefix speed >= {need}x", "model": model, "shape": shape,
                        "value": round(speed, 3), "met": speed >= need}
                floor = _find(train, model=model, shape=shape, method="frozen")
                if floor and floor.get("step_ms"):
                    # The frozen model's own forward+backward bounds every frozen-backbone method from below, so
                    # PEFT's step over it is the largest speed-up any prefix implementation can reach.
                    item["ceiling"] = round(peft["step_ms"] / floor["step_ms"], 3)
                    item["ours_over_floor"] = round(ours["step_ms"] / floor["step_ms"], 3)
                out.append(item)
                if ours.get("peak_gib") is not None and peft.get("peak_gib") is not None:
                    out.append({"target": "prefix peak memory < PEFT prefix", "model": model, "shape": shape,
                                "value": f"{ours['peak_gib']:.2f} vs {peft['peak_gib']:.2f} GiB",
                                "met": ours["peak_gib"] < peft["peak_gib"]})
            for method, ref, limit in (("apt", "prefix", 1.15), ("idspam", "prefix", 1.10), ("idspam", "prompt", 1.10)):
                a, b = _find(train, model=model, shape=shape, method=method), _find(train, model=model, shape=shape,
                                                                                   method=ref)
                if a and b:
                    ratio = a["step_ms"] / b["step_ms"]
                    out.append({"target": f"{method} step time <= {limit}x {ref}", "model": model, "shape": shape,
                                "value": round(ratio, 3), "met": ratio <= limit})
            out += _issue18(train, model, shape)
            pre = _find(train, model=model, shape=shape, method="prefix")
            if pre and pre.get("mfu") is not None and (model, shape) == ("qwen1.5b", "4x2048"):
                out.append({"target": "prefix training MFU >= 35%", "model": model, "shape": shape,
                            "value": round(pre["mfu"], 4), "value_needed": round(pre["mfu_needed"], 4),
                            "met": pre["mfu"] >= 0.35})
    mem = [r for r in rows if r.get("section") == "memory"]
    for model in sorted({r["model"] for r in mem}):
        for shape in sorted({r["shape"] for r in mem if r["model"] == model}):
            ours = _find(mem, model=model, shape=shape, method="prefix", gradient_checkpointing=True)
            peft_rows = [r for r in mem if r["model"] == model and r["shape"] == shape and r["method"] == "peft_prefix"]
            if ours:
                def gib(r: dict) -> str:
                    return "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f} GiB"

                desc = "; ".join(f"gc={'y' if r['gradient_checkpointing'] else 'n'}: {r['status']}"
                                 + (f" {gib(r)}" if r["status"] == "ok" else "") for r in peft_rows)
                peft_ok = [r for r in peft_rows if r["status"] == "ok"]
                if ours.get("peak_gib") is None and peft_ok:
                    met = None  # memory is not tracked on CPU
                else:
                    met = (not peft_ok) or all(r.get("peak_gib") is not None and ours["peak_gib"] < r["peak_gib"]
                                               for r in peft_ok)
                out.append({"target": "prefix+checkpointing fits where PEFT prefix OOMs or uses more", "model": model,
                            "shape": shape, "value": f"ours {gib(ours)}; PEFT {desc}", "met": met})
    return out


def _issue18(train: list[dict], model: str, shape: str) -> list[dict]:
    """Issue 18's GPU goals on step_ms (the median of interleaved rounds): prefix <= PEFT prefix, prefix <= 1.05x
    the frozen floor at sequence 2048, APT <= 1.10x prefix, ID-SPAM and LPT <= 1.10x prompt tuning."""
    out = []
    checks = [("prefix", "peft_prefix", 1.0), ("apt", "prefix", 1.10), ("idspam", "prompt", 1.10),
              ("lpt", "prompt", 1.10)]
    if int(shape.split("x")[1]) >= 2048:
        checks.append(("prefix", "frozen", 1.05))
    for method, ref, limit in checks:
        a, b = _find(train, model=model, shape=shape, method=method), _find(train, model=model, shape=shape,
                                                                           method=ref)
        if a and b:
            ratio = a["step_ms"] / b["step_ms"]
            out.append({"target": f"issue 18: {method} step <= {limit}x {ref}", "model": model, "shape": shape,
                        "value": round(ratio, 3), "met": ratio <= limit,
                        "spread": [round(a["step_ms_spread"][0] / b["step_ms_spread"][1], 3),
                                   round(a["step_ms_spread"][1] / b["step_ms_spread"][0], 3)]
                        if "step_ms_spread" in a and "step_ms_spread" in b else None})
    return out
