"""The run's report: report.md, and report.html with the pictures inside (one file to send).

Built from what the stages wrote into the run directory (config, results, finetune, manifest,
validation, the evaluations store); a stage that has not run is said to be missing, not invented.
"""

from __future__ import annotations

import base64
import html
import os
import re
import sqlite3
from pathlib import Path

from edgeprune.runs import write_text
from edgeprune.search.measured import held_name


def _pct(v) -> str:
    return "" if v is None else f"{v:.2%}"


def _ms(v) -> str:
    return "" if v is None else f"{v:.4g} ms"


class _Doc:
    """Sections of markdown and the same content as HTML."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list]) -> None:
        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        self.md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        self.md.append("")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, path: Path, caption: str) -> None:
        if not path.is_file():
            return
        self.md.append(f"![{caption}]({path.name})\n")
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )


EXPORT_HEADER = [
    "format",
    "file",
    "bytes",
    "max abs diff vs PyTorch",
    "top-1 agreement",
    "runtime test accuracy",
    "parity",
]


def export_rows(manifest: dict) -> list[list[str]]:
    """One row per exported format: file, size, parity against PyTorch (and its verdict), the
    runtime's test accuracy."""
    rows = []
    for fmt, a in manifest["formats"].items():
        p = a.get("parity", {})
        size = sum(f["bytes"] for f in a["files"])
        diff = f"{p['max_abs_diff']:.2e}" if "max_abs_diff" in p else p.get("error", "")
        verdict = "not checked" if "passed" not in p else "passed" if p["passed"] else f"FAILS: {p['failed']}"
        rows.append(
            [fmt, a["path"], f"{size:,}", diff, _pct(p.get("top1_agreement")), _pct(p.get("test_accuracy")), verdict]
        )
    return rows


def plan_summary(results: dict, plan=None) -> str:
    """The chosen plan in one line, as prune logs it and `run` prints it (from results.json, and the
    plan for the channels each group keeps): what it keeps of the dense model, its scores, its
    measured latency and the round of the measured search that chose it."""
    c, d = results["chosen"], results["dense"]
    top1 = results.get("task", "top-1") == "top-1"
    name, score = ("proxy accuracy", "{:.2%}".format) if top1 else ("proxy score", "{:.4g}".format)
    chosen_round = "" if c.get("round") is None else f", round {c['round'] + 1} of {results['rounds']}"
    if results.get("loosened") and c.get("round") == results["rounds"] - 1:
        chosen_round += " (at the loosened search budget)"
    line = (
        f"chosen plan {c['plan_hash'][:8]}{chosen_round}: {c['macs'] / 1e6:.2f} of {d['macs'] / 1e6:.2f} MMACs "
        f"({c['macs'] / d['macs']:.0%}), {c['params']:,} of {d['params']:,} params; {name} "
        f"{score(c['proxy_accuracy'])} (dense {score(d['proxy_accuracy'])}); measured {c['measured_ms']:.4g} ms "
        f"({held_name(results.get('held_on'))}) in the search"
    )
    if plan is not None:  # by layer name, numbers in order (layer2.0 before layer10.0)
        counts = plan.counts
        order = sorted(plan.widths, key=lambda g: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", g)])
        line += "; channels kept: " + ", ".join(f"{g} {counts[g]}/{plan.widths[g]}" for g in order)
    if c.get("removed_blocks"):
        line += f"; residual blocks removed whole: {', '.join(c['removed_blocks'])}"
    return line


def _noisy(measured: dict) -> str:
    """The rounds behind a measurement, where they disagree (the figure beside the figure: that the
    device is noisy is said once, by the run's warning, not on every row)."""
    from edgeprune.latency.interleave import noisy_rounds

    extra = measured.get("extra", {})
    rounds = noisy_rounds(extra.get("rounds_ms") or [])
    kept = "the quietest" if extra.get("statistic", "quietest") == "quietest" else "the median"
    return f" (rounds {rounds}; {kept} counts)" if rounds else ""


def _prediction_note(val: dict) -> str:
    """The prediction's error; where the dense model measures differently now than at the search,
    the search's own figure beside it (the prediction shown is carried by that ratio)."""
    if val["prediction_error_pct"] is None:
        return ""
    note = f"error {val['prediction_error_pct']:+.1f} %"
    then, dense_then = val.get("predicted_at_search_ms"), val.get("dense_at_search_ms")
    if then and dense_then and abs(val["predicted_ms"] / then - 1) > 0.005:
        note += (
            f" ({then:.4g} ms at the search, error {val['prediction_error_at_search_pct']:+.1f} %; the dense"
            f" model measured {dense_then:.4g} ms then, {val['dense_measured']['median_ms']:.4g} ms now)"
        )
    return note


def referred_note(val: dict) -> str:
    """Where a share-of-dense budget referred the shipped model to the dense model as measured at
    the search (validate.py's `verdict`), the figure held against the budget and why; else ""."""
    v = val.get("verdict")
    held = val.get("held_ms")
    raw = v["steady"][f"{v['statistic']}_ms"] if v else val["measured"]["median_ms"]
    if held is None or abs(held / raw - 1) < 0.0005:
        return ""
    what = v["statistic"] if v else "measured"
    return (
        f"{what} {held:.4g} ms as referred to the dense model at the search, as a {val['budget']} budget is: "
        f"{val['dense_at_search_ms']:.4g} ms then, {val['dense_measured']['median_ms']:.4g} ms now"
    )


def verdict_text(val: dict) -> str:
    """The validation's verdict in one line, naming the statistic it was decided on (a validation
    written before the verdict named one: its quietest window, as it was decided then)."""
    from edgeprune.latency.verdict import verdict_line

    if val.get("verdict"):
        return verdict_line(val["verdict"])
    return ("meets the budget" if val["meets_budget"] else "misses the budget") + " (on the quietest window)"


def validation_rows(val: dict) -> list[list[str]]:
    """The validation table (label, value, note), as the report and `edgeprune validate` show it."""
    referred = referred_note(val)
    share = ""
    if str(val.get("budget", "")).endswith("%"):
        share = f"{val['budget']} of the dense model " + ("at the search" if val.get("dense_at_search_ms") else "here")
    v = val.get("verdict")
    rows = [
        ["budget", _ms(val["budget_ms"]), share],
        [
            f"verdict, on the {v['statistic']} of steady runs" if v else "verdict",
            v["outcome"].upper() if v else ("meets" if val["meets_budget"] else "MISSES"),
            verdict_text(val) + (f"; {referred}" if referred else ""),
        ],
        [
            "shipped model, quietest window",
            _ms(val["measured"]["median_ms"]),
            "the figure of the ratios below" + _noisy(val["measured"]),
        ],
        ["predicted by the table", _ms(val["predicted_ms"]), _prediction_note(val)],
        [
            "dense model, measured",
            _ms(val["dense_measured"]["median_ms"]),
            f"speedup {val['speedup']:.2f}x" + _noisy(val["dense_measured"]),
        ],
        [
            "test accuracy",
            _pct(val["test_accuracy"]),
            ""
            if val["accuracy_delta_points"] is None
            else f"{val['accuracy_delta_points']:+.2f} points vs dense"
            + (f" (both on the first {val['accuracy_images']:,} test images)" if val.get("accuracy_images") else ""),
        ],
    ]
    sp, tw = val.get("unstructured_sparse"), val.get("precision_twin")
    if sp:
        rows.append(_other_model_row(f"unstructured sparse, same weights ({sp['sparsity']:.0%} zeros)", sp))
    if tw:
        rows.append(_other_model_row(f"same structure in {tw['precision']}", tw))
    if val.get("claim"):
        cl = val["claim"]
        also = "".join(f", {p} structured {cl[f'{p}_structured_speedup']:.2f}x" for p in ("int8", "fp32")
                       if f"{p}_structured_speedup" in cl)  # fmt: skip
        rows.append(
            [
                "claimed speedup",
                f"{cl['claimed_speedup']:.2f}x",
                f"measured {cl['measured_speedup']:.2f}x ({cl['share_of_claim']:.0%} of the claim){also}",
            ]
        )
    return rows


CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}figure{display:inline-block;margin:0.5em}img{max-width:460px}
figcaption{font-size:0.85em;color:#555;text-align:center}.pass{color:#070}.fail{color:#b00}"""


def write_report(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.md and report.html (and prediction.png) into the run directory."""
    from edgeprune.runs import RunDir

    folder = RunDir(run_dir)
    run = folder.path
    config = folder.read("config.json") or {}
    results, fine, val = folder.read("results.json"), folder.read("finetune.json"), folder.read("validation.json")
    doc = _Doc()
    model = results["model"] if results else config.get("weights", "?")
    device = results["device"] if results else config.get("device", "?")  # the profile's name, not its path
    doc.heading(f"edgeprune run: {model} on {device}", 1)
    if val:
        _summary(doc, val)
    _settings(doc, config)
    if results:
        _table_section(doc, results, config)
        _search_section(doc, run, results, val)
    else:
        doc.para("The search has not run yet (no results.json).")
    _finetune_section(doc, fine)
    doc.heading("Export")
    if manifest := folder.manifest():
        doc.table(EXPORT_HEADER, export_rows(manifest))
    else:
        doc.para("Not exported (export.json missing).")
    doc.heading("Validation on the device")
    if val:
        doc.table(["", "value", "note"], validation_rows(val))
    else:
        doc.para("Not validated (validation.json missing).")
    return _write_pages(run, doc, model)


def _summary(doc: _Doc, val: dict) -> None:
    """The report's first paragraph: the verdict, the speedup and the accuracy it cost."""
    referred = referred_note(val)
    doc.para(
        f"On {val['device']}, the shipped model {verdict_text(val)}" + (f"; {referred}" if referred else "") + ". "
        f"In its quietest window {val['measured']['median_ms']:.4g} ms, "
        f"{val['speedup']:.2f}x faster than the dense model ({val['dense_measured']['median_ms']:.4g} ms); "
        f"test accuracy {_pct(val['test_accuracy'])} vs {_pct(val['dense_test_accuracy'])} dense."
    )


def _settings(doc: _Doc, config: dict) -> None:
    doc.heading("Settings")
    shown = (
        {**config, "model": (config.get("model") or {}).get("name")}
        if isinstance(config.get("model"), dict)
        else config
    )
    hidden = ("model_hash", "model_args", "input_shape")
    doc.table(
        ["setting", "value"], [[k, v] for k, v in shown.items() if v not in (None, [], "", {}) and k not in hidden]
    )


def _table_section(doc: _Doc, results: dict, config: dict) -> None:
    """The budget, the dense model's measurement and the latency table the search predicted from."""
    doc.heading("Latency table and device")
    doc.para(
        f"Budget {results['budget_ms']:.4g} ms ({config.get('budget')}); dense model measured "
        f"{results['dense']['measured_ms']:.4g} ms on {results['device']}; search constrained by "
        f"{results['cost']}; predictions anchored on the dense measurement by a factor "
        f"{results.get('anchor') or 1:.3f}."
    )
    if not (t := results.get("table")):
        return
    fp = t["fingerprint"]
    doc.table(
        ["latency table", "device profile", "runtime", "CPU / GPU", "threads", "precision", "step", "entries"],
        [
            [
                t["path"],
                t["device"],
                f"{fp.get('runtime')} {fp.get('version')}",
                fp.get("cpu") or fp.get("gpu"),
                fp.get("threads", ""),
                fp.get("precision"),
                t["step"],
                t["entries"],
            ]
        ],
    )


def _search_section(doc: _Doc, run: Path, results: dict, val: dict | None) -> None:
    """The chosen plan beside the dense model, how the search got there, and its plots."""
    from edgeprune.report.plots import prediction_plot

    doc.heading("Search")
    d, c = results["dense"], results["chosen"]

    def row(name: str, plan: dict, predicted: str) -> list:
        macs, params = f"{plan['macs'] / 1e6:.2f}", f"{plan['params']:,}"
        return [name, _pct(plan["proxy_accuracy"]), predicted, _ms(plan["measured_ms"]), macs, params]

    doc.table(
        ["", "proxy accuracy", "predicted", f"measured ({held_name(results.get('held_on'))})", "MMACs", "params"],
        [row("dense", d, ""), row("chosen", c, _ms(c["predicted_ms"]))],
    )
    loosened = " (the last at a loosened search budget: the first plans measured well under the target)"
    doc.para(
        f"{results['search']}: {results['evals']} evaluations ({results['seconds_per_eval'] or 0:.2f} s each), "
        f"99 % of the best proxy accuracy after {results['evals_to_99pct']}; {results['rounds']} round(s) of "
        "hardware-in-the-loop measurement"
        + (loosened if results.get("loosened") else "")
        + "."
        + (f" Residual blocks removed whole: {', '.join(c['removed_blocks'])}." if c.get("removed_blocks") else "")
    )
    if text := precision_text(results):
        doc.para(text)
    prediction_plot(_prediction_points(run, c, val), run / "prediction.png", title="predicted vs measured latency")
    doc.image(run / "convergence.png", "best proxy accuracy against evaluations")
    doc.image(run / "scatter.png", "proxy accuracy against latency, every evaluation")
    doc.image(run / "prediction.png", "predicted against measured latency on the device")


def _other_model_row(label: str, row: dict) -> list[str]:
    """A model measured beside the shipped one (sparse, the other precision): ms and speedup over dense."""
    return [label, _ms(row["measured"]["median_ms"]), f"speedup {row['speedup']:.2f}x" + _noisy(row["measured"])]


def precision_text(results: dict) -> str:
    """What precision the search ran at, against what dense figure; both of `--precision auto`."""
    p, said = results.get("precision") or {}, []
    if p.get("reference_ms") is not None:
        said.append(
            f"Searched in {p['searched']} on {p['device']}: the dense model measured "
            f"{p['reference_ms']:.4g} ms in {p['reference_precision']} on {p['reference_device']} (what a "
            f"share-of-dense budget is of), the chosen plan {p['speedup_vs_reference']:.2f}x faster than it"
            + (", by quantizing alone (nothing pruned)." if p.get("quantized_alone") else ".")
        )
    if choice := results.get("precision_choice"):
        from edgeprune.pipeline.precision import describe

        lines = describe(choice).splitlines()[1:]
        said.append("`--precision auto`: " + "; ".join(line.strip() for line in lines) + ".")
    return " ".join(said)


def _prediction_points(run: Path, chosen: dict, val: dict | None) -> list[dict]:
    """Predicted vs measured ms: every candidate the search measured, and the shipped model."""
    points = []
    if (run / "evals.sqlite").is_file():
        with sqlite3.connect(run / "evals.sqlite") as db:
            points = [
                {"predicted_ms": p, "measured_ms": m, "label": "search candidates"}
                for p, m in db.execute("SELECT predicted_ms, measured_ms FROM measurements")
            ]
    if val and chosen.get("predicted_ms"):
        points.append(
            {
                "predicted_ms": chosen["predicted_ms"],
                "measured_ms": val["measured"]["median_ms"],
                "label": "shipped model (validation)",
            }
        )
    return points


def _finetune_section(doc: _Doc, fine: dict | None) -> None:
    doc.heading("Finetuning")
    if not fine:
        doc.para("Not finetuned (finetune.json missing).")
        return
    doc.para(
        f"{fine['epochs']} epochs distilled from the dense model (T = {fine['distillation']['temperature']}, "
        f"alpha = {fine['distillation']['alpha']}); best epoch {fine['best_epoch']}: held-out "
        f"{_pct(fine['heldout_accuracy_before'])} -> {_pct(fine['heldout_accuracy'])}, test "
        f"{_pct(fine['test_accuracy'])} (dense {_pct(fine['dense_test_accuracy'])})."
    )
    history = [[h["epoch"], _pct(h.get("score", h.get("heldout_accuracy")))] for h in fine["history"]]
    doc.table(["epoch", "held-out accuracy"], history)
    if fine.get("qat"):
        doc.para(f"Quantization-aware finetune (`--qat`): {fine['qat']['summary']}.")


def _write_pages(run: Path, doc: _Doc, model) -> dict[str, Path]:
    md = run / "report.md"
    write_text(md, "\n".join(doc.md) + "\n")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>edgeprune report: {html.escape(str(model))}</title>"
        f"<style>{CSS}</style></head><body>{''.join(doc.html)}</body></html>\n"
    )
    out = run / "report.html"
    write_text(out, page)
    return {"markdown": md, "html": out}
