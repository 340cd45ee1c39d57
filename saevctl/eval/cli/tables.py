"""The rich tables and text lines `saevctl eval` prints: one builder per evaluation, shared by its own command,
`eval all` and `eval card` (the face's formatting, kept apart from the command registrations)."""

from __future__ import annotations

import math
from typing import Any


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"



def _ci(c: dict[str, Any], pct: bool = False) -> str:
    return f"{_fmt(c['mean'], pct)} [{_fmt(c['lo'], pct)}, {_fmt(c['hi'], pct)}]"



def splice_tables(res: Any) -> list[Any]:
    """A rich table: each metric for the original, spliced and ablated model, and the fraction recovered."""
    from rich.table import Table

    from saevctl.eval.common import kinds_text

    out: list[Any] = [f"{res.n_images} images ({res.n_failed} unreadable); head {res.head} ({res.task}); "
                      f"{kinds_text(res.kinds)} tokens at layer {res.layer} spliced; "
                      f"ablation mean from {res.mean_source}"]
    out += [f"[yellow]note:[/] {n}" for n in res.notes]
    t = Table(title="behaviour kept with the SAE spliced in (mean [95% bootstrap CI])")
    t.add_column("metric", ratio=1)
    for col in ("original", "spliced", "ablated", "recovered"):
        t.add_column(col, justify="right")
    for r in res.rows:
        t.add_row(r["label"], *(_ci(r[v]) for v in ("original", "spliced", "ablated")), _ci(r["recovery"], pct=True))
    out.append(t)
    out.append(f"[bold]fraction of performance recovered: {_fmt(res.recovery, pct=True)}[/] "
               "((spliced - ablated) / (original - ablated), first metric)")
    return out



def edits_tables(res: Any, limit: int = 30) -> list[Any]:
    """Rich tables: per class, target and other change rates for the feature and the two controls; then each
    class's verdict and flips against the true label; then the verdict over all classes, its numbers and test."""
    from rich.markup import escape
    from rich.table import Table

    from saevctl.edit.effects import verdict_text

    image = getattr(res, "level", "patch") == "image"
    out: list[Any] = [f"{res.n_images} masked images ({res.n_unmasked} without a mask skipped, "
                      f"{res.n_failed} unreadable); feature max/frequency from {res.freq_source}"]
    out += [f"[yellow]note:[/] {n}" for n in res.notes]
    conds = list(res.overall["conditions"])
    what = "images whose predicted class changes" if image else "patches whose predicted class changes"
    shown = [*sorted(res.rows[:-1], key=lambda r: -r["n_target"])[:limit], res.overall]
    t = Table(title=f"edit specificity: share of {what} (mean [95% bootstrap CI])")
    t2 = Table(title="verdict, and true-label flips: share of the units right before the edit that are wrong after")
    t.add_column("class (feature, AUROC, set to)", ratio=1)
    t2.add_column("class", ratio=1)
    for tab, cols in ((t, ("condition", "prediction flips" if image else "target", *(() if image else ("other",)))),
                      (t2, ("condition", "true-label flips", "verdict"))):
        for col in cols:
            tab.add_column(col, justify="left" if col in ("condition", "verdict") else "right", no_wrap=True)
    for r in shown:
        label = f"all {r['n_classes']} classes" if r is res.overall else _edit_label(r)
        v = r.get("verdict")
        for i, c in enumerate(conds):
            rc, end = r["conditions"][c], i == len(conds) - 1
            cells = [_ci(rc["target"], pct=True), *(() if image else (_ci(rc["other"], pct=True),))]
            t.add_row(label if i == 0 else "", c, *cells, end_section=end)
            t2.add_row(r["class"] if i == 0 else "", c, _ci(rc["true"], pct=True) if "true" in rc else "n/a",
                       v["result"] if v and i == 0 else "", end_section=end)
    out += [t, t2]
    if len(res.rows) - 1 > limit:
        out.append(f"{len(res.rows) - 1 - limit} more classes in the JSON summary")
    unit = "the image's prediction" if image else ("target: patches predicted as the class before the edit; other: "
                                                   "all other patches of those images")
    out.append(f"{unit}. controls: a random feature of similar frequency, and a random direction of the edit's "
               "norm, on the same patches")
    if res.overall.get("verdict"):
        v = res.overall["verdict"]
        color = {"specific": "green", "too small": "yellow"}.get(v["result"], "red")
        word, _, rest = verdict_text(v).partition(":")
        out += [f"[bold {color}]all classes, {word}:[/]{escape(rest)}", f"[dim]test: {escape(v['test'])}[/]"]
    return out



def _edit_label(r: dict[str, Any]) -> str:
    auroc = f", AUROC {r['auroc']:.3f}" if r.get("auroc") is not None else ""
    return f"{r['class']} ({r['feature']}{auroc}, {r['value']:.3g})"



def recon_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [("MSE (normalised, per element)", _fmt(r["mse"])), ("normalised MSE (FVU)", _fmt(r["nmse"])),
            ("L0", _fmt(r["l0"])), ("dead", _fmt(r["dead"], pct=True)),
            ("dense (> 1% of tokens)", _fmt(r["dense"], pct=True))]



def _recon_table(figures: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"reconstruction on {figures['n_tokens']:,} tokens of {figures['n_images']:,} images",
              show_header=False)
    for k, v in recon_rows(figures):
        t.add_row(k, v)
    return t



def card_table(card: dict[str, Any]) -> list[Any]:
    """The report card (card.json's content) as one rich table of what ran, then a line per skipped part."""
    from rich.table import Table

    t = Table(title=f"SAE report card: {card['sae']['name']}")
    for col in ("part", "figure", "value"):
        t.add_column(col, justify="right" if col == "value" else "left")
    sec = card["sections"]
    if sec.get("recon"):
        for i, (k, v) in enumerate(recon_rows(sec["recon"])):
            t.add_row("reconstruction" if i == 0 else "", k, v, end_section=i == 4)
    if sec.get("splice"):
        sp, first = sec["splice"], sec["splice"]["metrics"][0]
        t.add_row("splice", f"{first['label']}: original / spliced / ablated",
                  " / ".join(_fmt(first[v]["mean"]) for v in ("original", "spliced", "ablated")))
        t.add_row("", f"recovered ({sp['head']})", _ci(first["recovery"], pct=True), end_section=True)
    if sec.get("coverage"):
        c = sec["coverage"]
        t.add_row("label coverage", f"classes with a feature of AUROC >= {c['min_auroc']:g}",
                  f"{_fmt(c['coverage'], pct=True)} ({c['n_covered']}/{c['n_classes']})", end_section=True)
    if sec.get("edits"):
        overall = sec["edits"]["classes"][-1]
        for i, (cond, v) in enumerate(overall["conditions"].items()):
            t.add_row("edits" if i == 0 else "", f"{cond}: target / other change",
                      f"{_fmt(v['target']['mean'], pct=True)} / {_fmt(v['other']['mean'], pct=True)}")
    for part, rows_of in (("spatial", spatial_rows), ("sparse_probe", probe_rows), ("absorption", absorption_rows)):
        if sec.get(part):
            t.add_section()
            for i, (k, v) in enumerate(rows_of(sec[part])):
                t.add_row(part.replace("_", " ") if i == 0 else "", k, v)
    if sec.get("baselines"):
        for i, m in enumerate(sec["baselines"]["metrics"]):
            if m["best"] is not None:
                t.add_row("vs baselines" if i == 0 else "", f"{m['label']}: margin over {m['best']}",
                          _margin(m["margin"], m["pct"]))
    out: list[Any] = [t]
    out += [f"[yellow]skipped {name}:[/] {why}" for name, why in card["skipped"].items()]
    return out



def _margin(c: dict[str, Any], pct: bool) -> str:
    """A margin with its CI, signed (percentage points for shares)."""
    scale, unit = (100.0, " pt") if pct else (1.0, "")
    if c["mean"] is None or not math.isfinite(c["mean"]):
        return "n/a"
    lo, hi = (f"{scale * v:+.4g}" if v is not None and math.isfinite(v) else "n/a" for v in (c["lo"], c["hi"]))
    return f"{scale * c['mean']:+.4g}{unit} [{lo}, {hi}]"



def baselines_tables(section: dict[str, Any]) -> list[Any]:
    """A rich table: each metric for the SAE and every baseline, and the SAE's margin over the best baseline."""
    from rich.table import Table

    kinds = list(section["baselines"])
    t = Table(title=f"the SAE against null baselines at k = {section['k']} (its mean L0 {section['sae_l0']:.1f}); "
                    "mean [95% bootstrap CI]")
    t.add_column("metric", ratio=1)
    for col in ["SAE", *kinds, "margin over the best baseline"]:
        t.add_column(col, justify="right")
    for m in section["metrics"]:
        vals = [_ci(m["sae"], m["pct"])] + [_fmt(m["baselines"][k]["value"]["mean"], m["pct"]) if k in m["baselines"]
                                             else "n/a" for k in kinds]
        best = f" ({m['best']})" if m["best"] else ""
        arrow = "higher" if m["higher_better"] else "lower"
        t.add_row(f"{m['label']} ({arrow} is better)", *vals,
                  (_margin(m["margin"], m["pct"]) + best) if m["margin"] else "n/a")
    out: list[Any] = [t]
    for k, b in section["baselines"].items():
        out.append(f"{k}: {'reused' if b['reused'] else 'built'} {b['path']}")
    out += [f"[yellow]note:[/] {n}" for n in section.get("notes", [])]
    return out



def stability_tables(res: Any) -> list[Any]:
    """Two matrix tables (decoder, encoder): per pair, the share of the narrower SAE's features whose one-to-one
    partner exceeds each threshold; then a line per pair of different widths for the nested (split) view."""
    from rich.table import Table

    from saevctl.eval.stability import THRESHOLDS

    keys = [f">{t:g}" for t in THRESHOLDS]
    out: list[Any] = []
    for kind, attr in (("decoder", "dec"), ("encoder", "enc")):
        t = Table(title=f"{kind} directions: features with a partner at cosine {' / '.join(keys)}")
        t.add_column("SAE (latents)")
        for name in res.names:
            t.add_column(name, justify="right")
        for i, (name, width) in enumerate(zip(res.names, res.widths, strict=True)):
            cells = ["-" if i == j else " / ".join(_fmt(getattr(res.pair(i, j), attr)[k], pct=True) for k in keys)
                     for j in range(len(res.names))]
            t.add_row(f"{name} ({width:,})", *cells)
        out.append(t)
    for p in res.pairs:
        if p.nested:
            n = p.nested
            hist = ", ".join(f"{k}: {v}" for k, v in n["histogram"].items())
            out.append(f"nested {n['narrow']} in {n['wide']}: {n['mean']:.2f} wide features per narrow one at "
                       f"cosine > {n['threshold']:g} ({_fmt(n['split'], pct=True)} split into 2+; counts {hist})")
        if p.exemplars:
            e = p.exemplars
            out.append(f"exemplars {p.a} vs {p.b}: top images of the {e['n_matched']:,} features matched at cosine > "
                       f"{e['matched_above']:g} overlap by {e['jaccard_matched']:.3f} (Jaccard), random pairs by "
                       f"{e['jaccard_random']:.3f}")
    if res.exemplar_note:
        out.append(f"note: {res.exemplar_note}")
    return out



def spatial_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"Moran's I ({s['adjacency']}): median [quartiles]",
             f"{_fmt(s['median'])} [{_fmt(s['q1'])}, {_fmt(s['q3'])}]"),
            ("features scored / no-structure value", f"{s['n_scored']:,} of {s['n_features']:,} / {_fmt(s['null'])}")]



def probe_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    return ([(f"k={r['k']}: SAE / raw balanced accuracy", f"{_ci(r['sae'])} / {_ci(r['raw'])}") for r in p["rows"]]
            + [("note", n) for n in p.get("notes", [])])



def absorption_rows(a: dict[str, Any]) -> list[tuple[str, str]]:
    return ([(f"absorbed (decoder cosine > {a['cos']:g}), mean of {a['n_tested']} classes", _ci(a["absorbed"], True)),
             ("best feature silent on the class's images", _ci(a["silent"], True))]
            + [("note", n) for n in a.get("notes", [])])



def vision_tables(part: str, fig: dict[str, Any], title: str, limit: int = 20) -> list[Any]:
    """The command's tables: the figures, and per k (probes) or per class (absorption) detail."""
    from rich.table import Table

    if part == "sparse_probe":
        t = Table(title=title)
        for col in ("k", "SAE codes", "raw activations", "SAE - raw"):
            t.add_column(col, justify="right")
        for r in fig["rows"]:
            t.add_row(str(r["k"]), _ci(r["sae"]), _ci(r["raw"]), _ci(r["diff"]))
        return [t]
    t = Table(title=title, show_header=False)
    for k, v in (spatial_rows if part == "spatial" else absorption_rows)(fig):
        t.add_row(k, v)
    if part != "absorption":
        return [t]
    c = Table(title="per class, most absorbed first")
    for col in ("class", "feature", "AUROC", "close", "silent", "absorbed", "absorbed by (images)"):
        c.add_column(col, justify="left" if col in ("class", "absorbed by (images)") else "right")
    tested = sorted((r for r in fig["classes"] if r["tested"]), key=lambda r: -r["absorbed"])
    for r in tested[:limit]:
        c.add_row(str(r["class"]), str(r["feature"]), f"{r['auroc']:.3f}", str(r["n_close"]), _fmt(r["silent"], True),
                  _fmt(r["absorbed"], True), ", ".join(f"{a['feature']} ({a['images']})" for a in r["absorbers"]))
    return [t, c]
