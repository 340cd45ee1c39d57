"""HTML of the report: the index page (one sortable, filterable table per SAE) and one page per feature.

Every string that comes from the index (file names, labels, ids, paths) passes through `esc`; JSON placed in a
<script> goes through `script_json`. A Content-Security-Policy allows only local files and the one known script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from saevctl.report.assets import JS
from saevctl.report.data import Exemplar
from saevctl.report.select import RULE

esc = html.escape  # quote=True: safe in text and in double-quoted attributes
TABLE_COLS = ("feature", "freq", "img_freq", "mean", "max", "label", "share", "page", "thumb", "concept", "auroc")
STAT_LABELS = {"freq": "firing frequency (tokens)", "img_freq": "firing frequency (images)",
               "mean": "mean when firing", "mean_all": "mean over all tokens", "max": "max",
               "img_mean": "mean of per-image score", "n_fired": "tokens fired"}


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: '<', '>' and '&' become \\u escapes, so '</script>' or '<!--' cannot occur."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def num(v: Any) -> float | int | None:
    """A JSON-able number (NaN and inf become null)."""
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    v = float(v)
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _csp(script: str | None) -> str:
    # Only local files (file: pages see their own folder as 'self' only in some browsers, hence file:).
    src = "'none'"
    if script is not None:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        src = f"'sha256-{digest}'"
    return (f"default-src 'none'; img-src 'self' file: data:; style-src 'self' file: 'unsafe-inline'; "
            f"script-src {src}; base-uri 'none'; form-action 'none'")


def _head(title: str, css_href: str, script: str | None = None) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(_csp(script))}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        f"<title>{esc(title)}</title>\n<link rel=\"stylesheet\" href=\"{esc(css_href)}\">\n</head>\n<body>\n"
    )


def histogram_svg(
    counts: np.ndarray | None, edges: list[tuple[float, float]], width: int = 560, height: int = 180
) -> str:
    """Inline SVG bar chart of counts per log10 bin (log-scaled heights, empty edge bins trimmed)."""
    if counts is None or not counts.any():
        return "<p class=\"dead\">no firing values recorded</p>"
    nz = np.nonzero(counts)[0]
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    c = counts[lo:hi].astype(np.float64)
    pad_l, pad_b, pad_t = 44, 34, 10
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    bw = plot_w / len(c)
    top = math.log10(1 + c.max())
    parts = [f"<svg class=\"hist\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
             f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"activation histogram\">"]
    for i, v in enumerate(c):
        h = plot_h * math.log10(1 + v) / top
        x, y = pad_l + i * bw, pad_t + plot_h - h
        b_lo, b_hi = edges[lo + i]
        parts.append(f"<rect class=\"bar\" x=\"{x:.1f}\" y=\"{y:.1f}\" width=\"{max(bw - 1, 1):.1f}\" "
                     f"height=\"{h:.1f}\"><title>[{b_lo:.3g}, {b_hi:.3g}): {int(v):,}</title></rect>")
    step = max(1, len(c) // 6)
    for i in range(0, len(c), step):
        x = pad_l + i * bw
        parts.append(f"<text x=\"{x:.1f}\" y=\"{height - pad_b + 14}\">{edges[lo + i][0]:.2g}</text>")
    parts.append(f"<text x=\"{pad_l}\" y=\"{height - 6}\">activation (log10 bins; bar height log count)</text>")
    parts.append(f"<text x=\"2\" y=\"{pad_t + 10}\">{int(c.max()):,}</text>")
    parts.append(f"<line x1=\"{pad_l}\" y1=\"{pad_t + plot_h}\" x2=\"{width - 8}\" y2=\"{pad_t + plot_h}\" "
                 "stroke=\"#999\"/>")
    return "".join(parts) + "</svg>"


def _exemplar_table(exs: list[Exemplar], n_patches: int) -> str:
    rows = []
    for e in exs:
        name = PurePosixPath(e.path.replace("\\", "/")).name or e.path
        fired = f"{e.n_fired} / {n_patches}" if e.acts_hw is not None else ""
        rows.append(f"<tr><td>{e.rank + 1}</td><td>{e.image_id}</td><td class=\"text\"><span class=\"image-name\" "
                    f"title=\"{esc(e.path)}\">{esc(name)}</span></td><td class=\"text\">{esc(e.label or '')}</td>"
                    f"<td>{e.value:.4g}</td><td>{fired}</td></tr>")
    return ("<table class=\"exemplars\"><thead><tr><th>rank</th><th>image id</th><th class=\"text\">image</th>"
            "<th class=\"text\">label</th><th>value</th><th>patches fired</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def token_section(token: str, stats: dict[str, Any], exs: list[Exemplar], grid_name: str | None,
                  hist: np.ndarray | None, edges: list[tuple[float, float]], n_patches: int, feature: int) -> str:
    """Exemplar grid, exemplar list, statistics and histogram of a feature on one token kind."""
    head = f"<section class=\"token\" data-token=\"{esc(token)}\"><h2>{esc(token)} tokens</h2>"
    if not stats["n_fired"]:
        return head + "<p class=\"dead\">never fires on these tokens</p></section>"
    out = [head]
    if grid_name and exs:
        alt = f"top {len(exs)} images of feature {feature}, firing patches highlighted"
        out.append(f"<p><img class=\"grid\" src=\"{esc(grid_name)}\" alt=\"{esc(alt)}\"></p>")
        out.append(_exemplar_table(exs, n_patches))
    rows = "".join(f"<tr><td>{esc(STAT_LABELS[k])}</td><td>{fmt(stats[k])}</td></tr>" for k in STAT_LABELS)
    out += [f"<h3>Statistics ({esc(token)})</h3>", f"<table class=\"stats\">{rows}</table>",
            f"<h3>Activation histogram ({esc(token)})</h3>", histogram_svg(hist, edges), "</section>"]
    return "\n".join(out)


def labels_html(rows: list[dict[str, Any]]) -> str:
    """The feature's best class per level (saevctl features label), or nothing when the SAE is not labelled."""
    if not rows:
        return ""
    items = []
    for r in rows:
        if r["class_name"] is None:
            items.append(f"<li>{esc(r['level'])} level: none (never fires on labelled data)</li>")
            continue
        thr = f" at &gt; {fmt(r['threshold'])}" if r["threshold"] is not None else ""
        items.append(f"<li>{esc(r['level'])} level: <b class=\"concept\">{esc(r['class_name'])}</b> "
                     f"<span class=\"meta\">AUROC {r['auroc']:.3f}, best F1 {r['f1']:.3f}{thr}</span></li>")
    return "<section class=\"labels\"><h2>Concept (features label)</h2><ul>" + "".join(items) + "</ul></section>"


def neighbours_html(near: list[tuple[int, float]] | None, pages: dict[int, str], live: set[int] | None = None,
                    max_features: int | None = None) -> str:
    """The nearest features, linked where they have a page; the others say why not: never fired, or fired but
    left out by --max-features (`live`: every feature that fired)."""
    if near is None:
        return "<p class=\"dead\">neighbours unavailable: the index lacks this SAE's decoder directions</p>"
    items = []
    for f, sim in near:
        if f in pages:
            items.append(f"<li><a href=\"{esc(pages[f])}\">feature {f}</a> "
                         f"<span class=\"meta\">cosine {sim:.3f}</span></li>")
        elif live is not None and f in live:
            items.append(f"<li class=\"dead\">feature {f} (not in this report: fired; left out by --max-features "
                         f"{max_features}): run saevctl features show --id {f} "
                         f"<span class=\"meta\">cosine {sim:.3f}</span></li>")
        else:
            items.append(f"<li class=\"dead\">feature {f} (never fired, no page) "
                         f"<span class=\"meta\">cosine {sim:.3f}</span></li>")
    return "<ol class=\"neighbours\">" + "".join(items) + "</ol>"


def feature_page(sae: dict[str, Any], feature: int, sections: list[str], near_html: str,
                 prev_next: tuple[int | None, int | None], pages: dict[int, str]) -> str:
    """One feature's page; `sections` come from token_section, links are relative to the SAE's folder."""
    prev, nxt = prev_next
    nav = [f"<a href=\"../../index.html#{esc(sae['anchor'])}\">&larr; all features</a>"]
    if prev is not None:
        nav.append(f"<a rel=\"prev\" href=\"{esc(pages[prev])}\">&lsaquo; feature {prev}</a>")
    if nxt is not None:
        nav.append(f"<a rel=\"next\" href=\"{esc(pages[nxt])}\">feature {nxt} &rsaquo;</a>")
    return (
        _head(f"feature {feature} · {sae['sae_id']}", "../../style.css")
        + f"<nav>{''.join(nav)}</nav>\n<h1>Feature {feature} <small>{esc(sae['sae_id'])}</small></h1>\n"
        + f"<p class=\"meta\">{esc(sae['summary'])}</p>\n" + "\n".join(sections)
        + "\n<h2>Nearest features (decoder cosine)</h2>\n" + near_html + "\n</body>\n</html>\n"
    )


def sae_section(sae: dict[str, Any], rows: list[list[Any]]) -> str:
    """One SAE's block of the index page: summary, filter box, table skeleton and its rows as JSON."""
    heads = [("feature", "feature", ""), ("freq", "freq", ""), ("img_freq", "img freq", ""), ("mean", "mean", ""),
             ("max", "max", ""), ("label", "label (share of top images)", "text")]
    labelled = bool(sae.get("label_level"))  # saevctl features label ran: each feature's best class and AUROC
    if labelled:
        heads += [("concept", f"concept ({sae['label_level']} level)", "text"), ("auroc", "AUROC", "")]
    ths = "".join(f"<th data-key=\"{k}\" class=\"{c}\">{esc(t)}</th>" for k, t, c in heads) + "<th>top image</th>"
    skipped = sae["n_skipped"]
    return (
        f"<section class=\"sae\" id=\"{esc(sae['anchor'])}\">\n<h2>{esc(sae['sae_id'])}</h2>\n"
        f"<p class=\"meta\">{esc(sae['summary'])}<br>{sae['n_pages']:,} features with pages; "
        f"{skipped:,} never fired and were skipped (no page)"
        + (f"; {sae['n_unlisted']:,} live features left out by --max-features" if sae.get("n_unlisted") else "")
        + ".</p>\n" + pick_html(sae)
        + (f"<p class=\"card\"><a href=\"{esc(sae['card'])}\">report card</a> (saevctl eval all: reconstruction, "
           "splice recovery, label coverage, edit specificity)</p>\n" if sae.get("card") else "")
        + "<div class=\"controls\"><input type=\"search\" class=\"filter\" "
        "placeholder=\"filter: 12 &middot; a label word &middot; freq&gt;1e-3 max&gt;2\" "
        f"aria-label=\"filter the features of {esc(sae['sae_id'])}\"><span class=\"count\"></span></div>\n"
        f"<table class=\"features\"><thead><tr>{ths}</tr></thead><tbody></tbody></table>\n"
        "<button type=\"button\" class=\"more\" hidden>show more</button>\n"
        "<script type=\"application/json\" class=\"feature-data\">"
        f"{script_json({'cols': TABLE_COLS, 'rows': rows, 'labelled': labelled})}</script>\n"
        "</section>\n"
    )


def pick_html(sae: dict[str, Any]) -> str:
    """Which features have pages, and by what rule (saevctl.report.select)."""
    if not sae.get("n_unlisted"):
        return "<p class=\"pick\">Pages: every feature that fired.</p>\n"
    n_live = sae["n_pages"] + sae["n_unlisted"]
    head = f"Pages: {sae['n_pages']:,} of the {n_live:,} live features (--max-features {sae['max_features']}), "
    if sae.get("pick") == "freq":
        return f"<p class=\"pick\">{esc(head)}the most frequent (--pick freq).</p>\n"
    return (f"<p class=\"pick\">{esc(head)}picked by interpretability (--pick interpretable): {esc(RULE)}. "
            "A feature without a page is one command away: saevctl features show --id N.</p>\n")


def index_page(index_path: str, saes: list[dict[str, Any]], sections: list[str], created: str) -> str:
    summary = "".join(
        f"<tr><td class=\"text\"><a href=\"#{esc(s['anchor'])}\">{esc(s['sae_id'])}</a></td>"
        f"<td class=\"text\">{esc(s['model_spec'])}</td><td>{s['layer']}</td><td>{s['n_latents']:,}</td>"
        f"<td>{s['n_images']:,}</td><td>{s['n_pages']:,}</td><td>{s['n_skipped']:,}</td></tr>" for s in saes)
    return (
        _head("saevctl feature report", "style.css", JS)
        + "<h1>SAE feature report</h1>\n"
        + f"<p class=\"meta\">index <code>{esc(index_path)}</code> &middot; made {esc(created)}</p>\n"
        + "<table class=\"saes\"><thead><tr><th class=\"text\">SAE</th><th class=\"text\">model</th><th>layer</th>"
        "<th>features</th><th>images</th><th>pages</th><th>never fired</th></tr></thead>"
        + f"<tbody>{summary}</tbody></table>\n"
        + "<noscript><p>The feature tables need JavaScript; every feature page under saes/ works without it.</p>"
        "</noscript>\n"
        + "".join(sections) + f"<script>{JS}</script>\n</body>\n</html>\n"
    )
