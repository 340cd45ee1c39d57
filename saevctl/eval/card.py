"""The report card: one self-contained HTML page (inline CSS, no script, no external asset) and a JSON file with
the same figures: reconstruction, splice recovery, label coverage and edit specificity of one SAE.
"""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saevctl import atomic, layout, workspace
from saevctl.eval.common import FORMAT, jsonable, kinds_text, out_dpath
from saevctl.eval.config import CardQuery
from saevctl.layers import layer_text

esc = html.escape  # quote=True: safe in text and in double-quoted attributes
CARD_FORMAT = FORMAT + "-card"
SECTIONS = ("recon", "splice", "coverage", "edits", "spatial", "sparse_probe", "absorption", "baselines")
TITLES = {"recon": "Reconstruction", "splice": "Behaviour kept when spliced in", "coverage": "Label coverage",
          "edits": "Are edits specific", "baselines": "Better than chance? The SAE against null baselines",
          "spatial": "Spatial coherence", "sparse_probe": "Sparse probing of image labels",
          "absorption": "Feature absorption"}
ON_REQUEST = ("baselines", "spatial", "sparse_probe", "absorption")
"""Sections shown only when asked for (eval all --baselines, --vision), ran or not."""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;
color:#1c1c1c}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9rem}.skip{color:#8a5a00}table{border-collapse:collapse;margin:.6rem 0}
th,td{padding:.25rem .7rem;text-align:right;border-bottom:1px solid #eee}th{background:#f6f6f6}
td.text,th.text{text-align:left}.big{font-size:1.6rem;font-weight:600}
.bar{background:#eee;width:16rem;height:.8rem;display:inline-block;vertical-align:middle;position:relative}
.bar span{background:#3a7bd5;height:100%;display:block}.ci{color:#666;font-size:.85rem}
""".strip()


def num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{float(v):.{digits}g}"


def pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * float(v):.1f}%"


def _ci(c: dict[str, Any] | None, f: Any = num) -> str:
    if not c:
        return "n/a"
    return f"{esc(f(c.get('mean')))} <span class=\"ci\">[{esc(f(c.get('lo')))}, {esc(f(c.get('hi')))}]</span>"


def _bar(share: Any) -> str:
    if share is None or not math.isfinite(float(share)):
        return ""
    width = max(0.0, min(1.0, float(share))) * 100
    return (
        f'<span class="bar" role="img" aria-label="{width:.0f} percent"><span style="width:{width:.1f}%"></span></span>'
    )


def _table(head: list[str], rows: list[list[str]], text_cols: int = 1) -> str:
    ths = "".join(f"<th class=\"{'text' if i < text_cols else ''}\">{esc(h)}</th>" for i, h in enumerate(head))
    trs = "".join("<tr>" + "".join(f"<td class=\"{'text' if i < text_cols else ''}\">{c}</td>" for i, c in enumerate(r))
                  + "</tr>" for r in rows)
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>\n"


# --- sections ------------------------------------------------------------------------------------------


def recon_html(r: dict[str, Any]) -> str:
    rows = [["MSE (normalised space, per element)", esc(num(r["mse"]))],
            ["normalised MSE (fraction of variance unexplained)", esc(num(r["nmse"]))],
            ["L0 (active latents per token)", esc(num(r["l0"]))],
            ["dead latents (never fired)", esc(pct(r["dead"]))],
            ["dense latents (fire on > 1% of tokens)", esc(pct(r["dense"]))]]
    return (_table(["figure", "value"], rows)
            + f"<p class=\"meta\">{r['n_tokens']:,} tokens of {r['n_images']:,} images of the activation store at "
            f"<code>{esc(str(r['store']))}</code>.</p>\n")


def splice_html(s: dict[str, Any]) -> str:
    first = s["metrics"][0]
    rec = first["recovery"]["mean"]
    out = (f"<p><span class=\"big\">{esc(pct(rec))}</span> {_bar(rec)} of the head's performance recovered "
           f"((spliced &minus; ablated) / (original &minus; ablated), {esc(first['label'])}).</p>\n")
    rows = [[esc(m["label"]), _ci(m["original"]), _ci(m["spliced"]), _ci(m["ablated"]), _ci(m["recovery"], pct)]
            for m in s["metrics"]]
    out += _table(["metric", "original", "spliced", "mean-ablated", "recovered"], rows)
    out += (f"<p class=\"meta\">head <code>{esc(str(s['head']))}</code> ({esc(s['task'])}); "
            f"{esc(kinds_text(s['kinds']))} tokens at layer {s['layer']} replaced; {s['n_images']:,} images; "
            f"ablation mean from {esc(s['mean_source'])}; 95% bootstrap CIs over images.</p>\n")
    return out


def coverage_html(c: dict[str, Any]) -> str:
    return (f"<p><span class=\"big\">{esc(pct(c['coverage']))}</span> {_bar(c['coverage'])} of the {c['n_classes']:,} "
            f"labelled classes have a feature with patch-level AUROC &ge; {esc(num(c['min_auroc']))} "
            f"({c['n_covered']:,} classes).</p>\n")


def edits_html(e: dict[str, Any], limit: int = 40) -> str:
    rows = []
    classes = e["classes"]
    body = sorted(classes[:-1], key=lambda r: -r["n_target"])[:limit] + classes[-1:]
    for r in body:
        name = f"all {r['n_classes']} classes" if r["class_id"] is None else f"{r['class']} (feature {r['feature']})"
        for i, (cond, v) in enumerate(r["conditions"].items()):
            rows.append([esc(name) if i == 0 else "", esc(cond), _ci(v["target"], pct), _ci(v["other"], pct)])
    more = len(classes) - 1 - min(limit, len(classes) - 1)
    return (_table(["class", "condition", "target change rate", "other change rate"], rows, text_cols=2)
            + (f"<p class=\"meta\">{more} more classes in edits.json.</p>\n" if more > 0 else "")
            + f"<p class=\"meta\">Each class's feature set to {esc(str(e['value']))} on the class's patches of "
            f"{e['n_images']:,} masked images. Target: patches the head predicted as that class before the edit; "
            "other: every other patch of those images. Controls: a random feature of similar firing frequency and a "
            "random direction of the edit's norm, on the same patches. 95% bootstrap CIs over images.</p>\n")


def _signed(c: dict[str, Any] | None, as_pct: bool) -> str:
    """A margin and its CI, signed; shares in percentage points."""
    if not c or c.get("mean") is None:
        return "n/a"
    scale, unit = (100.0, " pt") if as_pct else (1.0, "")

    def f(v: Any) -> str:
        return "n/a" if v is None or not math.isfinite(float(v)) else f"{scale * float(v):+.3g}"

    return f"{esc(f(c['mean']))}{unit} <span class=\"ci\">[{esc(f(c.get('lo')))}, {esc(f(c.get('hi')))}]</span>"


def baselines_html(b: dict[str, Any]) -> str:
    kinds = list(b["baselines"])
    rows = []
    for m in b["metrics"]:
        fmt = pct if m["pct"] else num
        cells = [esc(fmt(m["baselines"][k]["value"]["mean"])) if k in m["baselines"] else "n/a" for k in kinds]
        best = f" ({esc(m['best'])})" if m["best"] else ""
        better = "higher" if m["higher_better"] else "lower"
        rows.append([f"{esc(m['label'])} <span class=\"ci\">{better} is better</span>", _ci(m["sae"], fmt), *cells,
                     _signed(m["margin"], m["pct"]) + best])
    out = _table(["metric", "SAE", *kinds, "SAE's margin over the best baseline"], rows)
    built = ", ".join(f"{esc(k)} ({'reused' if v['reused'] else 'built'})" for k, v in b["baselines"].items())
    out += (f"<p class=\"meta\">Each baseline is a TopK SAE of the same width with k = {b['k']} (the SAE's mean L0, "
            f"{esc(num(b['sae_l0']))}), scored by the same code: {built}. A positive margin means the SAE does better; "
            "95% paired bootstrap CIs over the metric's units (images; classes for labels, the sparse probe and "
            "absorption; feature slots for spatial coherence, which pairs nothing and resamples each SAE's features). "
            "untrained: random tied weights as training starts; random-decoder: a frozen random decoder with a trained "
            "encoder; pca, kmeans: principal directions or spherical k-means centroids as a tied dictionary.</p>\n")
    out += "".join(f"<p class=\"skip\">{esc(n)}</p>\n" for n in b.get("notes", []))
    return out


def spatial_html(s: dict[str, Any]) -> str:
    rows = [["median [quartiles]", f"{esc(num(s['median']))} <span class=\"ci\">[{esc(num(s['q1']))}, "
             f"{esc(num(s['q3']))}]</span>"], ["mean", esc(num(s["mean"]))],
            ["features scored", f"{s['n_scored']:,} of {s['n_features']:,}"],
            ["no spatial structure, -1/(N-1)", esc(num(s["null"]))]]
    return (_table(["Moran's I per feature", "value"], rows)
            + f"<p class=\"meta\">Moran's I of each feature's activation map on the {s['grid'][0]}x{s['grid'][1]} "
            f"patch grid ({esc(s['adjacency'])} adjacency), averaged over the images where it fires, of "
            f"{s['n_images']:,} stored images: 1 for a feature that fires on smooth regions, near 0 for scattered "
            "patches. Histogram and per-feature values: spatial.png and spatial.json beside this card.</p>\n")


def sparse_probe_html(p: dict[str, Any]) -> str:
    rows = [[str(r["k"]), _ci(r["sae"]), _ci(r["raw"]), _ci(r["diff"])] for r in p["rows"]]
    return (_table(["k", "SAE codes", "raw activations", "SAE - raw"], rows)
            + f"<p class=\"meta\">Held-out balanced accuracy (chance {num(p['chance'])}) of one-against-the-rest "
            f"probes for {len(p['classes']):,} {esc(p['labels'])} classes, each on the k features (SAE latents, or "
            "raw dimensions) whose standardised class means differ most, both pooled by max over the patches; "
            f"{p['n_train']:,} training and {p['n_test']:,} held-out images; 95% bootstrap CIs over held-out "
            "images.</p>\n" + "".join(f"<p class=\"skip\">{esc(n)}</p>\n" for n in p.get("notes", [])))


def absorption_html(a: dict[str, Any], limit: int = 20) -> str:
    tested = sorted((r for r in a["classes"] if r.get("tested")), key=lambda r: -r["absorbed"])[:limit]
    rows = [[esc(str(r["class"])), str(r["feature"]), esc(num(r["auroc"], 3)), str(r["n_close"]), esc(pct(r["silent"])),
             esc(pct(r["absorbed"]))] for r in tested]
    ab = a["absorbed"]
    return (f"<p><span class=\"big\">{esc(pct(ab['mean']))}</span> <span class=\"ci\">[{esc(pct(ab['lo']))}, "
            f"{esc(pct(ab['hi']))}]</span> of a "
            f"class's images, on average over {a['n_tested']} classes, lose the class's best feature to a feature "
            f"whose decoder direction has cosine above {esc(num(a['cos']))} with it.</p>\n"
            + _table(["class", "best feature", "AUROC", "close features", "silent", "absorbed"], rows)
            + f"<p class=\"meta\">Image level, {esc(a['labels'])} labels: a class is tested when its best feature's "
            f"AUROC reaches {esc(num(a['min_auroc']))} ({a['n_tested']} of {a['n_classes']}). Silent: the feature "
            "fires on no patch of the image; absorbed: silent while a close feature fires.</p>\n"
            + "".join(f"<p class=\"skip\">{esc(n)}</p>\n" for n in a.get("notes", [])))


RENDER = {"recon": recon_html, "splice": splice_html, "coverage": coverage_html, "edits": edits_html,
          "baselines": baselines_html, "spatial": spatial_html, "sparse_probe": sparse_probe_html,
          "absorption": absorption_html}


def card_html(card: dict[str, Any]) -> str:
    sae = card["sae"]
    desc = (
        f"model {sae.get('model_spec')}, layer {layer_text(sae.get('layer'))}, {sae.get('n_latents', 0):,} latents, "
        f"{sae.get('activation')}"
        + (f" k={sae['k']}" if sae.get("k") else "")
        + f", {kinds_text(sae.get('tokens', []))} tokens"
    )
    parts = [
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>{esc('report card: ' + str(sae['name']))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
        f"<h1>SAE report card: {esc(str(sae['name']))}</h1>\n",
        f'<p class="meta">{esc(desc)}<br><code>{esc(str(sae["path"]))}</code>',
        f" &middot; made {esc(card['created'])}</p>\n",
    ]
    for name in SECTIONS:
        if name in ON_REQUEST and card["sections"].get(name) is None and name not in card["skipped"]:
            continue
        parts.append(f"<section id=\"{name}\">\n<h2>{esc(TITLES[name])}</h2>\n")
        if card["sections"].get(name) is not None:
            parts.append(RENDER[name](card["sections"][name]))
        else:
            parts.append(f"<p class=\"skip\">Not evaluated: {esc(card['skipped'].get(name, 'not asked for'))}.</p>\n")
        parts.append("</section>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def write_card(dpath: Path, sae: dict[str, Any], sections: dict[str, Any],
               skipped: dict[str, str]) -> tuple[Path, Path, dict[str, Any]]:
    """Write card.html and card.json into `dpath` (each atomically); returns their paths and the card's figures."""
    card = {"schema_version": layout.EVAL_SCHEMA, "format": CARD_FORMAT,
            "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "sae": sae,
            "sections": {k: sections.get(k) for k in SECTIONS}, "skipped": skipped}
    card = jsonable(card)
    html_fpath, json_fpath = layout.eval_card_fpath(dpath), layout.eval_card_json_fpath(dpath)
    atomic.write_json(json_fpath, card)
    atomic.write_text(html_fpath, card_html(card))
    return html_fpath, json_fpath, card


def find_card(query: CardQuery) -> tuple[Path, dict[str, Any]]:
    """The card eval all last wrote for an SAE: its folder (--out, else the SAE's eval folder) and its content."""
    dpath = query.out if query.out is not None else out_dpath(workspace.resolve_sae_ref(query.sae), query.index)
    return dpath, read_card(dpath)


def read_card(dpath: Path) -> dict[str, Any]:
    """card.json of an eval folder, checked for format and schema."""
    import json

    from saevctl.errors import InputError

    fpath = layout.eval_card_json_fpath(dpath)
    try:
        card = json.loads(fpath.read_text())
    except FileNotFoundError as e:
        raise InputError(f"no report card at {fpath}", "run saevctl eval all first (or pass its --out)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(
            f"the report card {fpath} is unreadable ({type(e).__name__})", "run saevctl eval all again"
        ) from e
    if (not isinstance(card, dict) or card.get("format") != CARD_FORMAT
            or card.get("schema_version") != layout.EVAL_SCHEMA):
        raise InputError(f"{fpath} is not a report card of schema {layout.EVAL_SCHEMA}", "run saevctl eval all again")
    return card
