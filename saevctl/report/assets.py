"""The report's stylesheet and the index page's script (vanilla JS, no network): static text kept here so
pages.py stays about markup. The script builds rows with textContent only, never innerHTML.
"""

from __future__ import annotations

CSS = """\
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 2em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin: .2em 0 .4em; } h1 small { color: #666; font-weight: normal; font-size: .6em; }
h3 { font-size: 1em; margin: 1.1em 0 .4em; }
h2 { font-size: 1.15em; margin: 1.4em 0 .5em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; word-break: break-all; }
.meta { color: #555; }
nav { margin-bottom: .6em; } nav a { margin-right: 1em; }
table { border-collapse: collapse; }
th, td { padding: .2em .6em; text-align: right; border-bottom: 1px solid #eee; vertical-align: middle; }
th { background: #fafafa; position: sticky; top: 0; user-select: none; }
td.text, th.text { text-align: left; }
table.features th[data-key] { cursor: pointer; }
table.features th[aria-sort=ascending]::after { content: " \\25B2"; }
table.features th[aria-sort=descending]::after { content: " \\25BC"; }
table.features tbody tr:hover { background: #f5f8ff; }
img.thumb { width: 128px; height: 128px; display: block; }
.controls { margin: .5em 0; display: flex; gap: 1em; align-items: center; }
.controls input { width: 28em; padding: .3em .5em; font: inherit; }
.count { color: #555; }
button.more { margin: .6em 0; font: inherit; }
img.grid { max-width: 100%; height: auto; border: 1px solid #ddd; }
table.stats td:first-child { text-align: left; color: #555; }
svg.hist { background: #fff; border: 1px solid #ddd; }
svg.hist rect.bar { fill: #bc3754; } svg.hist text { font: 10px sans-serif; fill: #333; }
ol.neighbours li { margin: .15em 0; }
.dead { color: #888; }
"""

# Each SAE section holds <script type="application/json" class="feature-data"> with
# {"cols": [...], "rows": [[feature, freq, img_freq, mean, max, label, share, page, thumb, concept, auroc], ...],
#  "labelled": whether concept/auroc (saevctl features label) are shown}.
JS = """\
"use strict";
(function () {
  var NUM = /^(feature|freq|img_freq|mean|max|auroc)\\s*(<=|>=|<|>|=)\\s*([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)$/i;
  var STEP = 500;
  function fmt(v) {
    if (v === null || v === undefined) return "";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 ? v.toPrecision(3) : v.toExponential(2);
  }
  function parseFilter(text) {
    return text.trim().split(/\\s+/).filter(Boolean).map(function (tok) {
      var m = NUM.exec(tok);
      if (m) return { key: m[1].toLowerCase(), op: m[2], val: parseFloat(m[3]) };
      if (/^[0-9]+$/.test(tok)) return { key: "feature", op: "=", val: parseInt(tok, 10) };
      return { text: tok.toLowerCase() };
    });
  }
  function test(v, op, x) {
    return op === "<" ? v < x : op === ">" ? v > x : op === "<=" ? v <= x : op === ">=" ? v >= x : v === x;
  }
  function setup(section) {
    var data = JSON.parse(section.querySelector("script.feature-data").textContent);
    var col = {}; data.cols.forEach(function (c, i) { col[c] = i; });
    var tbody = section.querySelector("table.features tbody");
    var input = section.querySelector("input.filter");
    var count = section.querySelector(".count");
    var more = section.querySelector("button.more");
    var heads = section.querySelectorAll("table.features th[data-key]");
    var state = { key: "freq", desc: true, shown: STEP, rows: data.rows };
    function matches(row, terms) {
      return terms.every(function (t) {
        if (t.text !== undefined) {
          var label = row[col.label] === null ? "" : String(row[col.label]).toLowerCase();
          var concept = data.labelled && row[col.concept] !== null ? String(row[col.concept]).toLowerCase() : "";
          return label.indexOf(t.text) >= 0 || concept.indexOf(t.text) >= 0 ||
            String(row[col.feature]).indexOf(t.text) === 0;
        }
        var v = row[col[t.key]];
        return v !== null && test(v, t.op, t.val);
      });
    }
    function cell(tr, value, cls) {
      var td = document.createElement("td");
      if (cls) td.className = cls;
      if (value instanceof Node) td.appendChild(value); else td.textContent = value;
      tr.appendChild(td);
    }
    function draw() {
      var terms = parseFilter(input.value);
      var i = col[state.key], sign = state.desc ? -1 : 1;
      var rows = data.rows.filter(function (r) { return matches(r, terms); });
      rows.sort(function (a, b) {
        var x = a[i], y = b[i];
        if (x === y) return a[col.feature] - b[col.feature];
        if (x === null) return 1;
        if (y === null) return -1;
        return (x < y ? -1 : 1) * sign;
      });
      state.rows = rows;
      var frag = document.createDocumentFragment();
      rows.slice(0, state.shown).forEach(function (r) {
        var tr = document.createElement("tr");
        tr.dataset.feature = r[col.feature];
        var link = document.createElement("a");
        link.href = r[col.page]; link.textContent = r[col.feature];
        cell(tr, link);
        ["freq", "img_freq", "mean", "max"].forEach(function (k) { cell(tr, fmt(r[col[k]])); });
        var label = r[col.label] === null ? "" : r[col.label] + " (" + Math.round(100 * r[col.share]) + "%)";
        cell(tr, label, "text");
        if (data.labelled) {
          cell(tr, r[col.concept] === null ? "" : r[col.concept], "text");
          cell(tr, fmt(r[col.auroc]));
        }
        if (r[col.thumb]) {
          var a = document.createElement("a"), img = document.createElement("img");
          a.href = r[col.page]; img.src = r[col.thumb]; img.className = "thumb"; img.loading = "lazy";
          img.alt = "top exemplar of feature " + r[col.feature];
          a.appendChild(img); cell(tr, a);
        } else cell(tr, "");
        frag.appendChild(tr);
      });
      tbody.replaceChildren(frag);
      count.textContent = Math.min(state.shown, rows.length) + " shown of " + rows.length + " matching (" +
        data.rows.length + " features with pages)";
      more.hidden = rows.length <= state.shown;
      heads.forEach(function (th) {
        if (th.dataset.key === state.key) th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
        else th.removeAttribute("aria-sort");
      });
    }
    heads.forEach(function (th) {
      th.tabIndex = 0;
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); th.click(); }
      });
      th.addEventListener("click", function () {
        if (state.key === th.dataset.key) state.desc = !state.desc;
        else { state.key = th.dataset.key; state.desc = ["feature", "label", "concept"].indexOf(th.dataset.key) < 0; }
        draw();
      });
    });
    input.addEventListener("input", function () { state.shown = STEP; draw(); });
    more.addEventListener("click", function () { state.shown += STEP; draw(); });
    draw();
  }
  document.querySelectorAll("section.sae").forEach(setup);
})();
"""
