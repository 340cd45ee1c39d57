"use strict";
// saevctl serve: the page. Every element is built with createElement and textContent (never innerHTML), so names
// from the index or an upload are shown as text. State lives in the URL's hash (the permalink).
(function () {
  var $ = function (id) { return document.getElementById(id); };
  var info = null;
  var state = { image: null, sel: new Set(), feature: null, clamps: new Map(), patches: "fired", run: "", other: null };
  var listed = [];
  var seq = { select: 0, feature: 0 };
  var drag = null;
  var imagesOffset = 0;

  function el(tag, props, children) {
    var e = document.createElement(tag);
    Object.keys(props || {}).forEach(function (k) {
      if (k === "dataset") Object.assign(e.dataset, props[k]);
      else if (k === "style") e.style.cssText = props[k];  // CSSOM, which the CSP allows (no style attributes)
      else e[k] = props[k];
    });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    });
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 ? v.toPrecision(3) : v.toExponential(2);
  }
  function pct(v) { return (100 * v).toFixed(1) + "%"; }
  function signed(v, unit) {
    var text = (v > 0 ? "+" : "") + (unit === "%" ? (100 * v).toFixed(2) + "%" : v.toFixed(3));
    return el("span", { className: v > 0 ? "up" : v < 0 ? "down" : "", textContent: text });
  }
  function showError(err) {
    $("status").textContent = "";
    $("error").textContent = err && err.message ? err.message : String(err);
    $("error").hidden = false;
  }
  function status(text) { $("status").textContent = text; }
  function api(url, opts) {
    return fetch(url, opts || {}).then(function (res) {
      return res.json().catch(function () { return { error: "the server answered " + res.status }; })
        .then(function (body) {
          if (!res.ok) throw new Error(body.error || "the server answered " + res.status);
          $("error").hidden = true;
          return body;
        });
    });
  }
  function post(url, body) {
    return api(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }
  function setCli(text) { $("cli").textContent = text || ""; $("copied").textContent = ""; }
  function picture(path) { return path + "?s=" + encodeURIComponent(info.sae_id); }

  // --- state in the URL ---------------------------------------------------------------------
  function cellsText() {
    return Array.from(state.sel).map(function (k) { return k.split(",").map(Number); })
      .sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; })
      .map(function (rc) { return rc[0] + "," + rc[1]; }).join(";");
  }
  function clampList() {
    return Array.from(state.clamps.entries()).map(function (kv) { return kv[0] + "=" + kv[1]; });
  }
  function save() {
    var p = new URLSearchParams();
    if (state.image) p.set("image", state.image);
    if (state.sel.size) p.set("sel", cellsText());
    if (state.feature !== null) p.set("feature", String(state.feature));
    if (state.other) p.set("other", state.other);
    if (state.clamps.size) p.set("clamp", clampList().join(","));
    if (state.patches !== "fired") p.set("patches", state.patches);
    if (state.run) p.set("run", state.run);
    history.replaceState(null, "", "#" + p.toString());
    $("permalink").href = location.href;
  }
  function restore() {
    var p = new URLSearchParams(location.hash.slice(1));
    state.sel = new Set((p.get("sel") || "").split(";").filter(Boolean));
    state.clamps = new Map();
    (p.get("clamp") || "").split(",").filter(Boolean).forEach(function (c) {
      var i = c.indexOf("=");
      if (i > 0) state.clamps.set(c.slice(0, i), c.slice(i + 1));
    });
    state.patches = p.get("patches") || "fired";
    $("patches").value = state.patches;
    state.run = p.get("run") || "";
    state.other = p.get("other");
    var feature = p.get("feature");
    var image = p.get("image");
    var ready = image ? openImage(image, true) : Promise.resolve();
    ready.then(function () {
      if (state.run === "edit") applyEdit();
      else if (state.run === "controls") runControls();
      if (feature !== null && /^[0-9]+$/.test(feature)) openFeature(Number(feature));
    }).catch(showError);
  }

  // --- the image list and uploads -----------------------------------------------------------
  function imageButton(img) {
    var b = el("button", { type: "button", title: img.name + (img.label ? " (" + img.label + ")" : ""),
      dataset: { id: img.id } }, [img.id + " · " + img.name + (img.label ? " · " + img.label : "")]);
    b.addEventListener("click", function () { openImage(img.id, false).catch(showError); });
    return el("li", {}, [b]);
  }
  function loadImages(append) {
    if (!append) imagesOffset = 0;
    var q = encodeURIComponent($("search").value);
    return api("/api/images?q=" + q + "&offset=" + imagesOffset + "&limit=100").then(function (res) {
      var items = res.images.map(imageButton);
      if (append) items.forEach(function (li) { $("images").appendChild(li); });
      else $("images").replaceChildren.apply($("images"), items);
      imagesOffset += res.images.length;
      $("images-count").textContent = imagesOffset + " of " + res.total + " store images";
      $("more").hidden = imagesOffset >= res.total;
      markCurrent();
    });
  }
  function markCurrent() {
    document.querySelectorAll(".image-list button").forEach(function (b) {
      b.classList.toggle("current", b.dataset.id === state.image);
    });
  }
  function upload(file) {
    status("uploading " + file.name + "…");
    return api("/api/upload", { method: "POST", body: file, headers: {
      "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) } })
      .then(function (img) {
        $("uploads").prepend(imageButton(img));
        return openImage(img.id, false);
      }, function (err) {
        if (!(err instanceof TypeError)) throw err;  // fetch's own failure: the server closed the connection
        throw new Error("the upload of " + file.name + " (" + (file.size / 1e6).toPrecision(3) + " MB) did not " +
          "reach the server; its limit is " + info.limits.upload_bytes / 1e6 + " MB");
      });
  }

  // --- the image and its patch grid ---------------------------------------------------------
  function buildGrid() {
    var gh = info.grid[0], gw = info.grid[1], grid = $("grid");
    grid.style.gridTemplateRows = "repeat(" + gh + ", 1fr)";
    grid.style.gridTemplateColumns = "repeat(" + gw + ", 1fr)";
    var cells = [];
    for (var r = 0; r < gh; r++) for (var c = 0; c < gw; c++) {
      cells.push(el("div", { className: "cell", dataset: { rc: r + "," + c } }));
    }
    grid.replaceChildren.apply(grid, cells);
  }
  function paintGrid(edited) {
    var pending = drag ? rectCells(drag.start, drag.end) : new Set();
    document.querySelectorAll("#grid .cell").forEach(function (cell) {
      var k = cell.dataset.rc;
      cell.classList.toggle("sel", state.sel.has(k));
      cell.classList.toggle("pending", pending.has(k));
      if (edited !== undefined) cell.classList.toggle("edited", edited.has(k));
    });
    $("sel-count").textContent = state.sel.size ? state.sel.size + " patches selected" : "no patches selected: " +
      "the list is over the whole image";
  }
  function cellAt(ev) {
    var rect = $("grid").getBoundingClientRect();
    var r = Math.floor((ev.clientY - rect.top) / rect.height * info.grid[0]);
    var c = Math.floor((ev.clientX - rect.left) / rect.width * info.grid[1]);
    return [Math.max(0, Math.min(info.grid[0] - 1, r)), Math.max(0, Math.min(info.grid[1] - 1, c))];
  }
  function rectCells(a, b) {
    var out = new Set();
    for (var r = Math.min(a[0], b[0]); r <= Math.max(a[0], b[0]); r++)
      for (var c = Math.min(a[1], b[1]); c <= Math.max(a[1], b[1]); c++) out.add(r + "," + c);
    return out;
  }
  function setupGrid() {
    var grid = $("grid");
    grid.addEventListener("pointerdown", function (ev) {
      if (!state.image) return;
      grid.setPointerCapture(ev.pointerId);
      drag = { start: cellAt(ev), end: cellAt(ev), remove: ev.shiftKey };
      paintGrid();
    });
    grid.addEventListener("pointermove", function (ev) {
      if (!drag) return;
      drag.end = cellAt(ev);
      paintGrid();
    });
    grid.addEventListener("pointerup", function (ev) {
      if (!drag) return;
      drag.end = cellAt(ev);
      var cells = rectCells(drag.start, drag.end), remove = drag.remove;
      var click = cells.size === 1;
      drag = null;
      cells.forEach(function (k) {
        if (click ? state.sel.has(k) : remove) state.sel.delete(k); else state.sel.add(k);
      });
      paintGrid();
      refreshSelection().catch(showError);
    });
  }
  function openImage(id, keep) {
    state.image = id;
    if (!keep) { state.sel = new Set(); state.clamps = new Map(); state.run = ""; }
    $("view").src = picture("/api/image/" + encodeURIComponent(id) + "/view.png");
    $("edit").hidden = true;
    $("controls-out").hidden = true;
    markCurrent();
    paintGrid(new Set());
    return refreshSelection();
  }

  // --- the selection's features (the paper's Figure 2) --------------------------------------
  function refreshSelection() {
    save();
    var mine = ++seq.select;
    status(state.sel.size ? "summing codes over " + state.sel.size + " patches…" : "encoding the image…");
    var url = "/api/select?image=" + encodeURIComponent(state.image) + "&cells=" + encodeURIComponent(cellsText());
    return api(url).then(function (res) {
      if (mine !== seq.select) return;
      $("image-title").textContent = res.image.name + (res.image.label ? " · " + res.image.label : "") +
        (res.image.upload ? " (upload)" : " (store image " + res.image.id + ")");
      listed = res.features;
      renderFeatures();
      setCli(res.cli);
      status("");
    });
  }
  function clampControl(f) {
    var current = state.clamps.get(String(f));
    var mode = current === undefined ? "off" : current === "0" ? "zero" : /x$/.test(current) ? "times" : "value";
    var select = el("select", { title: "clamp feature " + f }, [
      el("option", { value: "off", textContent: "—" }), el("option", { value: "zero", textContent: "0 (ablate)" }),
      el("option", { value: "times", textContent: "× its max" }), el("option", { value: "value", textContent: "= value" }),
    ]);
    select.value = mode;
    var input = el("input", { type: "number", step: "any", value: mode === "times" ? current.slice(0, -1)
      : mode === "value" ? current : "2", title: "clamp value" });
    input.hidden = mode === "off" || mode === "zero";
    function update() {
      input.hidden = select.value === "off" || select.value === "zero";
      var v = input.value.trim() || "0";
      if (select.value === "off") state.clamps.delete(String(f));
      else state.clamps.set(String(f), select.value === "zero" ? "0" : select.value === "times" ? v + "x" : v);
      renderChips();
      save();
    }
    select.addEventListener("change", update);
    input.addEventListener("input", update);
    return el("span", { className: "clamp", dataset: { feature: String(f) } }, [select, " ", input]);
  }
  function renderFeatures() {
    var rows = listed.map(function (r) {
      var link = el("button", { type: "button", className: "link feature-link", textContent: String(r.feature) });
      link.addEventListener("click", function () { openFeature(r.feature); });
      var label = r.label ? r.label.name + " (AUROC " + fmt(r.label.auroc) + ")" : "";
      var here = el("img", { src: picture("/api/heat/" + encodeURIComponent(state.image) + "/" + r.feature + ".png"),
        alt: "where feature " + r.feature + " fires on this image", className: "heat" });
      var strip = el("img", { src: picture("/api/strip/" + r.feature + ".png"), className: "strip",
        alt: "top images of feature " + r.feature });
      return el("tr", { dataset: { feature: String(r.feature) } }, [
        el("td", {}, [link]), el("td", { className: "text" }, [label]), el("td", {}, [fmt(r.sum)]),
        el("td", {}, [r.fired + "/" + (state.sel.size || info.grid[0] * info.grid[1])]), el("td", {}, [fmt(r.freq)]),
        el("td", { className: "text" }, [here, strip]), el("td", { className: "text" }, [clampControl(r.feature)]),
      ]);
    });
    $("feature-list").tBodies[0].replaceChildren.apply($("feature-list").tBodies[0], rows);
    $("features-note").textContent = rows.length ? "Ranked by the sum of each feature's codes over the " +
      (state.sel.size ? state.sel.size + " selected patches." : "whole image (select patches to narrow it).")
      : "No feature fires on the selected patches.";
    renderChips();
  }
  function renderChips() {
    var chips = clampList().map(function (text) {
      var x = el("button", { type: "button", title: "remove this clamp", textContent: "×" });
      x.addEventListener("click", function () {
        state.clamps.delete(text.split("=")[0]);
        renderFeatures();
        save();
      });
      return el("span", { className: "chip" }, [text, x]);
    });
    $("clamp-chips").replaceChildren.apply($("clamp-chips"), chips.length ? chips : [el("span", {
      className: "meta", textContent: "set a clamp on a listed feature, then apply" })]);
  }

  // --- edits ---------------------------------------------------------------------------------
  function editBody() {
    if (!state.image) throw new Error("pick an image first");
    return { image: state.image, clamps: clampList(), patches: state.patches, cells: cellsText() };
  }
  function applyEdit() {
    var body;
    try { body = editBody(); } catch (e) { showError(e); return Promise.resolve(); }
    state.run = "edit";
    save();
    status("running the edit through the rest of the model…");
    return post("/api/clamp", body).then(renderEdit).catch(showError);
  }
  function runControls() {
    var body;
    try { body = editBody(); } catch (e) { showError(e); return Promise.resolve(); }
    state.run = "controls";
    save();
    status("running the edit and two controls on " + info.control_images + " images…");
    return post("/api/controls", body).then(renderControls).catch(showError);
  }
  function classifyView(res) {
    var s = res.summary, seen = new Set(), rows = [];
    s.top_before.concat(s.top_after).forEach(function (r) {
      if (seen.has(r.class)) return;
      seen.add(r.class);
      rows.push(el("tr", {}, [
        el("td", { className: "text" }, [r.class]),
        el("td", {}, [el("span", { className: "bar before", style: "width:" + (120 * r.before).toFixed(1) + "px" }),
          r.before.toFixed(3)]),
        el("td", {}, [el("span", { className: "bar after", style: "width:" + (120 * r.after).toFixed(1) + "px" }),
          r.after.toFixed(3)]),
        el("td", {}, [signed(r.delta)]), el("td", {}, [r.rank_before + " → " + r.rank_after]),
      ]));
    });
    var moved = s.top_rank_after === 1 ? "stays at rank 1" : "drops to rank " + s.top_rank_after +
      " (new top: " + s.new_top_class + ")";
    return [el("table", { className: "before-after" }, [
      el("thead", {}, [el("tr", {}, ["class", "before", "after", "Δ", "rank"].map(function (h, i) {
        return el("th", { className: i ? "" : "text", textContent: h });
      }))]), el("tbody", {}, rows)]),
      el("p", {}, ["top class " + s.top_class + " " + moved + "; total variation " + s.tv.toFixed(3)])];
  }
  function denseView(res) {
    var s = res.summary;
    var panels = ["before", "after", "changed"].map(function (k) {
      var cap = k === "changed" ? "changed pixels (magenta), red up, blue down" : k;
      return el("figure", {}, [el("img", { src: res.maps[k], alt: k, className: "map-" + k }),
        el("figcaption", { textContent: cap })]);
    });
    var rows = s.rows.map(function (r) {
      return el("tr", {}, [el("td", { className: "text" }, [r.class]), el("td", {}, [pct(r.before)]),
        el("td", {}, [pct(r.after)]), el("td", {}, [signed(r.delta, "%")])]);
    });
    var line = "pixels that changed class: " + pct(s.changed);
    if (res.task === "saliency") {
      line += "; mean saliency " + s.mean_before.toFixed(3) + " → " + s.mean_after.toFixed(3) + "; mean |Δ| " +
        s.mad.toFixed(4);
    }
    return [el("div", { className: "panels" }, panels), el("table", { className: "before-after" }, [
      el("thead", {}, [el("tr", {}, [el("th", { className: "text", textContent: "class" }),
        el("th", { textContent: "before" }), el("th", { textContent: "after" }), el("th", { textContent: "Δ" })])]),
      el("tbody", {}, rows)]), el("p", { className: "changed-line", textContent: line })];
  }
  function renderEdit(res) {
    var desc = res.features.map(function (f, i) { return f + "=" + fmt(res.values[i]); }).join(", ");
    var out = $("edit");
    out.replaceChildren(el("h2", { textContent: "Edit: clamp " + desc + " on " + res.edited.length +
      " patches · head " + res.head + " (" + res.task + ")" }));
    res.notes.forEach(function (n) { out.appendChild(el("p", { className: "meta", textContent: "note: " + n })); });
    (res.task === "classify" ? classifyView(res) : denseView(res)).forEach(function (n) { out.appendChild(n); });
    out.hidden = false;
    paintGrid(new Set(res.edited.map(function (rc) { return rc[0] + "," + rc[1]; })));
    setCli(res.cli);
    status("");
  }
  function ciBar(c, lo, hi, cls) {
    var span = hi - lo || 1, pos = function (v) { return (100 * (v - lo) / span).toFixed(2) + "%"; };
    return el("span", { className: "ci", title: "mean " + fmt(c.mean) + ", 95% CI [" + fmt(c.lo) + ", " +
      fmt(c.hi) + "]" }, [el("span", { className: "zero", style: "left:" + pos(0) }),
      el("span", { className: "span " + cls, style: "left:" + pos(c.lo) + ";width:" +
        (100 * (c.hi - c.lo) / span).toFixed(2) + "%" }), el("span", { className: "mean", style: "left:" + pos(c.mean) })]);
  }
  function renderControls(res) {
    var out = $("controls-out");
    var ctrl = res.control_features.map(function (f, i) { return f + "=" + fmt(res.control_values[i]); }).join(", ");
    out.replaceChildren(el("h2", { textContent: "Controls: " + res.n_images + " images (" + res.how + ")" }),
      el("p", { className: "meta", textContent: "the edit touched patches in " + res.n_fired + " of them; controls: " +
        "random feature " + ctrl + " (similar frequency, from " + res.freq_source + ") and a random direction " +
        "of the same norm on the same patches" }));
    res.notes.forEach(function (n) { out.appendChild(el("p", { className: "meta", textContent: "note: " + n })); });
    var rows = [];
    res.rows.forEach(function (r) {
      var cells = r.conditions.map(function (c) { return [c.condition, c]; }).concat(r.vs_controls.map(function (v) {
        return ["feature − " + v.control, v];
      }));
      var vals = [0];
      cells.forEach(function (x) { if (x[1].lo !== null) vals.push(x[1].lo, x[1].hi); });
      var lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
      cells.forEach(function (x, i) {
        var c = x[1];
        rows.push(el("tr", { className: i === 0 ? "metric-start" : "" }, [
          el("td", { className: "text" }, [i === 0 ? r.label + (r.magnitude ? " *" : "") : ""]),
          el("td", { className: "text" }, [x[0]]), el("td", {}, [fmt(c.mean)]),
          el("td", {}, ["[" + fmt(c.lo) + ", " + fmt(c.hi) + "]"]),
          el("td", { className: "text" }, [c.lo === null ? "" : ciBar(c, lo, hi, x[0] === "feature" ? "feature" : "")]),
        ]));
      });
    });
    out.appendChild(el("table", { className: "controls-table" }, [el("thead", {}, [el("tr", {}, [
      "metric", "condition", "mean", "95% bootstrap CI", ""].map(function (h, i) {
        return el("th", { className: i < 2 || i === 4 ? "text" : "", textContent: h });
      }))]), el("tbody", {}, rows)]));
    var verdict = res.verdict ? res.verdict.result : res.specific === true ? "specific" : res.specific === false ?
      "not specific" : "no controls";
    out.appendChild(el("p", { className: "verdict " + (verdict === "specific" ? "specific" : "not"),
      textContent: verdict + (res.specific === true ? ": the * effect is larger than both controls'" : "") }));
    out.hidden = false;
    setCli(res.cli);
    status("");
  }

  // --- a feature's page ----------------------------------------------------------------------
  function featureLink(f, text) {
    var b = el("button", { type: "button", className: "link", textContent: text || String(f) });
    b.addEventListener("click", function () { openFeature(f); });
    return b;
  }
  function openFeature(f) {
    state.feature = f;
    save();
    var mine = ++seq.feature;
    status("reading feature " + f + "…");
    var url = "/api/feature/" + f + (state.other ? "?other=" + encodeURIComponent(state.other) : "");
    return api(url).then(function (res) {
      if (mine === seq.feature) renderFeature(res);
    }).catch(showError);
  }
  function closeFeature() {
    state.feature = null;
    $("feature-page").hidden = true;
    save();
  }
  function histogram(bins) {
    var nz = bins.map(function (b, i) { return b.count ? i : -1; }).filter(function (i) { return i >= 0; });
    if (!nz.length) return el("p", { className: "meta", textContent: "never fires" });
    var shown = bins.slice(nz[0], nz[nz.length - 1] + 1);
    var top = Math.log10(1 + Math.max.apply(null, shown.map(function (b) { return b.count; })));
    var bars = el("div", { className: "hist", title: "firing values, log10 bins; bar height is log count" },
      shown.map(function (b) {
        return el("div", { style: "height:" + (100 * Math.log10(1 + b.count) / top).toFixed(1) + "%",
          title: "[" + fmt(b.lo) + ", " + fmt(b.hi) + "): " + b.count });
      }));
    return el("div", {}, [bars, el("div", { className: "hist-axis" }, [el("span", { textContent: fmt(shown[0].lo) }),
      el("span", { textContent: "activation (log10 bins; bar height: log count)" }),
      el("span", { textContent: fmt(shown[shown.length - 1].hi) })])]);
  }
  function renderFeature(res) {
    var page = $("feature-page"), back = el("button", { type: "button", textContent: "close" });
    back.addEventListener("click", closeFeature);
    var labels = res.labels.filter(function (l) { return l.name !== null; }).map(function (l) {
      return l.name + " (" + l.level + " AUROC " + fmt(l.auroc) + ")";
    }).join("; ");
    var st = res.stats, stats = el("table", { className: "stats" }, [["firing frequency (tokens)", st.freq],
      ["firing frequency (images)", st.img_freq], ["mean when firing", st.mean], ["max", st.max],
      ["mean image score", st.img_mean], ["tokens fired", st.n_fired]].map(function (kv) {
        return el("tr", {}, [el("td", { className: "text", textContent: kv[0] }), el("td", { textContent: fmt(kv[1]) })]);
      }));
    var tops = res.top.map(function (t) {
      var img = el("img", { src: picture("/api/tile/" + res.feature + "/" + t.rank + ".png"), alt: "top image " +
        (t.rank + 1), title: "open this image" });
      img.addEventListener("click", function () { closeFeature(); openImage(t.image_id, false).catch(showError); });
      return el("figure", {}, [img, el("figcaption", {}, ["#" + (t.rank + 1) + " · " + fmt(t.value) + " · " +
        t.fired + "/" + res.n_patches + " patches · ", el("span", { className: "image-name", textContent: t.name }),
        t.label ? " · " + t.label : ""])]);
    });
    var similar = el("ol", { className: "similar" }, res.similar.map(function (s) {
      return el("li", {}, [featureLink(s.feature), " cosine " + s.cosine.toFixed(3) + " · freq " + fmt(s.freq) +
        (s.label ? " · " + s.label.name : "")]);
    }));
    page.replaceChildren(el("h2", {}, ["Feature " + res.feature + (labels ? ": " + labels : "") + " ", back]), stats,
      el("h3", { textContent: "Activation histogram" }), histogram(res.histogram),
      el("h3", { textContent: "Top images (click one to open it)" }), el("div", { className: "tops" }, tops),
      el("h3", { textContent: "Similar features (decoder cosine, faiss)" }), similar, matchesView(res));
    page.hidden = false;
    setCli(res.cli);
    status("");
    page.scrollIntoView({ block: "start" });
  }
  function matchesView(res) {
    var box = el("div", { className: "matches" }, [el("h3", { textContent: "Matches in another SAE of this index" })]);
    if (!res.matches) {
      box.appendChild(el("p", { className: "meta", textContent: "this index holds no other SAE" }));
      return box;
    }
    var pick = el("select", { title: "SAE to search" }, res.others.map(function (o) {
      return el("option", { value: o, textContent: o });
    }));
    pick.value = res.matches.sae_id;
    pick.addEventListener("change", function () { state.other = pick.value; openFeature(res.feature); });
    box.appendChild(el("p", {}, ["in ", pick, res.matches.method ? " by " + res.matches.method : ""]));
    if (res.matches.note) box.appendChild(el("p", { className: "meta", textContent: res.matches.note }));
    box.appendChild(el("ol", {}, res.matches.rows.map(function (m) {
      return el("li", { textContent: "feature " + m.feature + " · score " + m.score.toFixed(3) });
    })));
    return box;
  }

  // --- start ---------------------------------------------------------------------------------
  function start() {
    setupGrid();
    $("search").addEventListener("input", function () { loadImages(false).catch(showError); });
    $("more").addEventListener("click", function () { loadImages(true).catch(showError); });
    $("upload").addEventListener("change", function () {
      var f = $("upload").files[0];
      if (f) upload(f).catch(showError);
      $("upload").value = "";
    });
    $("clear").addEventListener("click", function () { state.sel = new Set(); paintGrid(); refreshSelection().catch(showError); });
    $("patches").addEventListener("change", function () { state.patches = $("patches").value; save(); });
    $("apply").addEventListener("click", applyEdit);
    $("controls").addEventListener("click", runControls);
    $("copy").addEventListener("click", function () {
      var text = $("cli").textContent;
      var done = function () { $("copied").textContent = "copied"; };
      var fallback = function () {
        var range = document.createRange();
        range.selectNodeContents($("cli"));
        window.getSelection().removeAllRanges();
        window.getSelection().addRange(range);
        $("copied").textContent = "selected: press Ctrl-C";
      };
      if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, fallback); else fallback();
    });
    api("/api/info").then(function (res) {
      info = res;
      $("meta").textContent = "SAE " + res.sae_id + " · " + res.model + " layer " + res.layer + " · " +
        res.n_latents + " features · head " + res.head.name + " (" + res.head.task + ") · " + res.n_images +
        " images · index " + res.index;
      buildGrid();
      renderChips();
      return loadImages(false).then(restore);
    }).catch(showError);
  }
  document.addEventListener("DOMContentLoaded", start);
})();
