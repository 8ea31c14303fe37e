// The live page of `loop.py serve`: polls api/state and redraws. Every text that comes from the
// results (descriptions, notes, diffs, logs: written by an agent or a trainer) is put in with
// textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const COLORS = { keep: "#2e9d4a", keepDark: "#14532d", discard: "#9e9e9e", crash: "#d62728",
                   transfer: "#1f6fd1", holdout: "#8e44ad", run: "#1f6fd1", best: "#2e9d4a", abort: "#d62728" };
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  let pollMs = 2000;
  let lastRowsKey = null, lastPlotKey = null, lastCompareKey = null;
  let openRun = null;               // the run whose diff/log is open in the table
  const texts = new Map();          // "run/kind" -> {text, cut} or {error}
  let charts = {};
  let state = null;
  let lastOk = 0;

  // ---- formatting -------------------------------------------------------------------
  const bpb = (v) => (v === null || v === undefined ? "—" : v.toFixed(6));
  const signed = (v, d = 6) => (v === null || v === undefined ? "—" : (v > 0 ? "+" : v < 0 ? "−" : "±") + Math.abs(v).toFixed(d));
  const pct = (v) => (v === null || v === undefined ? "" : (v > 0 ? "+" : v < 0 ? "−" : "±") + Math.abs(v).toFixed(2) + "%");
  function clock(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}` : `${m}:${String(sec).padStart(2, "0")}`;
  }
  function duration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    if (s < 60) return `${s} s`;
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h} h ${String(m).padStart(2, "0")} min` : `${m} min ${String(s % 60).padStart(2, "0")} s`;
  }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function setText(id, text, title) {
    const e = $(id);
    e.textContent = text === null || text === undefined ? "—" : String(text);
    if (title !== undefined) e.title = title || "";
  }
  function facts(id, pairs) {
    const dl = $(id);
    dl.replaceChildren();
    for (const [k, v, title] of pairs) {
      if (v === null || v === undefined || v === "") continue;
      dl.append(el("dt", { text: k }), el("dd", { text: String(v), title: title || null }));
    }
  }

  // ---- polling ----------------------------------------------------------------------
  async function poll() {
    try {
      const r = await fetch("api/state", { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      state = await r.json();
      lastOk = Date.now();
      if (state.server && state.server.poll_seconds) pollMs = 1000 * state.server.poll_seconds;
      render(state);
    } catch (e) {
      const p = $("loopstate");
      p.textContent = "page server unreachable";
      p.className = "pill down";
    }
    setTimeout(poll, pollMs);
  }
  setInterval(() => {
    if (lastOk) setText("updated", `updated ${Math.round((Date.now() - lastOk) / 1000)} s ago`);
  }, 1000);

  function render(s) {
    const msg = $("message");
    msg.hidden = !s.message;
    msg.textContent = s.message || "";
    renderHeader(s);
    renderCards(s);
    renderCurrent(s);
    renderProgress(s);
    renderTable(s);
    renderNoise(s);
    renderCompare(s);
  }

  function renderHeader(s) {
    const h = s.host || {};
    const parts = [h.device, h.backend, h.protocol && `protocol ${h.protocol}`, h.branch].filter(Boolean);
    setText("host", parts.join(" · ") || (s.server && s.server.results) || "");
    const p = $("loopstate");
    if (s.current && s.loop && s.loop.running) { p.textContent = `loop running · run ${s.current.run}`; p.className = "pill running"; }
    else if (s.loop && s.loop.running) { p.textContent = "loop running"; p.className = "pill running"; }
    else if (s.current) { p.textContent = `run ${s.current.run} unfinished · no loop holds the lock`; p.className = "pill idle"; }
    else { p.textContent = "loop not running"; p.className = "pill idle"; }
    document.title = s.summary && s.summary.best_bpb ? `${bpb(s.summary.best_bpb)} · autoresearch live` : "autoresearch · live";
  }

  function renderCards(s) {
    const m = s.summary;
    if (!m) return;
    setText("c-best", bpb(m.best_bpb));
    setText("c-best-more", m.best_n !== null ? `#${m.best_n}${m.improved ? "" : " (baseline)"} · ${pct(m.gain_pct)} vs baseline` : "",
            m.best_basis || "");
    setText("c-base", bpb(m.baseline_bpb));
    setText("c-base-more", `${m.baseline_runs} baseline run${m.baseline_runs === 1 ? "" : "s"}`);
    setText("c-exp", m.experiments);
    setText("c-exp-more", m.tally, m.tally);
    const n = s.noise || {};
    setText("c-noise", n.sigma !== undefined ? n.sigma.toFixed(6) : "—");
    const floor = n.measured === null || n.measured === undefined ? "the --min-noise floor: no trainer has run twice"
      : n.measured < n.min_noise ? `the floor; measured ${n.measured.toFixed(6)}, ${n.df} df` : `pooled from repeats, ${n.df} df`;
    setText("c-noise-more", floor, n.describe);
    setText("c-cost", m.cost_usd === null ? "—" : `$${m.cost_usd.toFixed(2)}`);
    const last = s.rows.length ? s.rows[s.rows.length - 1] : null;
    setText("c-cost-more", m.tokens_in === null ? "no agent tokens recorded" :
      `${m.tokens_in.toLocaleString()} in · ${(m.tokens_out || 0).toLocaleString()} out` +
      (last && last.cost_usd !== null ? ` · last $${last.cost_usd.toFixed(4)}` : ""));
    setText("c-wall", duration(m.wall_seconds));
    setText("c-wall-more", "sum of the experiments' wall time");
  }

  // ---- the run in progress ----------------------------------------------------------
  function renderCurrent(s) {
    const c = s.current;
    $("cur-idle").hidden = !!c;
    $("cur").hidden = !c;
    if (!c) {
      setText("cur-run", "");
      const rows = s.rows || [];
      $("cur-idle").textContent = rows.length ? `No experiment is running; the last one, #${rows[rows.length - 1].n}, is in the table.` : "No experiment is running.";
      if (charts.loss) { charts.loss.destroy(); charts.loss = null; }
      return;
    }
    const more = (s.in_flight || []).length ? ` · also running on other workers: ${s.in_flight.map((n) => `runs/${n}`).join(", ")} (their logs arrive when they end)` : "";
    setText("cur-run", `runs/${c.run}${c.confirm ? " · confirm run" : ""} · ${c.phase}${more}`);
    setText("cur-desc", c.description);
    $("cur-bar").style.width = `${Math.min(100, 100 * (c.progress || 0)).toFixed(1)}%`;
    const ab = c.abort || {};
    let abortText = null;
    if (ab.active) {
      abortText = ab.margin === null ? `judged from ${Math.round(100 * ab.min_progress)}% of the budget on`
        : `${ab.margin >= 0 ? "inside" : "over"} the threshold by ${Math.abs(ab.margin).toFixed(4)} (at ${Math.round(100 * ab.at)}%)`;
    } else if (ab.why) abortText = ab.why;
    facts("cur-facts", [
      ["progress", c.step !== null ? `${(100 * c.progress).toFixed(1)}% · step ${c.step}` : "no step line yet"],
      ["training loss", c.loss !== null ? c.loss.toFixed(4) : null],
      ["tokens/s", c.tok_per_s !== null ? c.tok_per_s.toLocaleString() : null],
      ["time left", c.time_left_s !== null ? `${clock(c.time_left_s)} of training` : null, c.time_left_from],
      ["elapsed", c.elapsed_s !== null ? clock(c.elapsed_s) : null, "since the run's folder was made"],
      ["last output", c.last_output_s !== null ? `${Math.round(c.last_output_s)} s ago` : null],
      ["early abort", abortText],
    ]);
    drawLoss(c);
  }

  function drawLoss(c) {
    const datasets = [{ label: `this run (runs/${c.run})`, data: c.points.map(([x, y]) => ({ x, y })), borderColor: COLORS.run,
                        backgroundColor: COLORS.run, pointRadius: 0, borderWidth: 2, showLine: true }];
    if (c.best) datasets.push({ label: `best (runs/${c.best.run})`, data: c.best.points.map(([x, y]) => ({ x, y })),
                                 borderColor: COLORS.best, backgroundColor: COLORS.best, pointRadius: 0, borderWidth: 1.5, showLine: true });
    if (c.abort && c.abort.active && c.abort.threshold.length) datasets.push({ label: "early-abort threshold",
      data: c.abort.threshold.map(([x, y]) => ({ x, y })), borderColor: COLORS.abort, backgroundColor: COLORS.abort,
      borderDash: [5, 4], pointRadius: 0, borderWidth: 1.2, showLine: true });
    const ys = datasets.flatMap((d) => d.data.map((p) => p.y)).filter((y) => isFinite(y)).sort((a, b) => a - b);
    // the first steps' loss is far above the rest: scale to where the curves are compared
    const top = ys.length ? ys[Math.floor(0.97 * (ys.length - 1))] : undefined;
    const opts = baseOptions("% of the time budget", "training loss");
    opts.scales.x.min = 0; opts.scales.x.max = 100;
    if (top !== undefined) opts.scales.y.max = top + 0.05 * (top - ys[0] || 1);
    upsert("loss", "loss-chart", "scatter", datasets, opts);
  }

  // ---- the progress plot --------------------------------------------------------------
  function renderProgress(s) {
    const key = JSON.stringify([s.rows, s.plot]);
    if (key === lastPlotKey || !s.plot) return;
    lastPlotKey = key;
    const p = s.plot, rows = s.rows;
    let lo = p.y_min, hi = p.y_max;
    const hold = rows.filter((r) => r.holdout_bpb);
    for (const r of hold) { if (lo !== null) { lo = Math.min(lo, r.holdout_bpb); hi = Math.max(hi, r.holdout_bpb); } }
    const groups = { baseline: [], keep: [], discard: [], transfer: [], off: [], none: [] };
    for (const r of rows) {
      const point = { x: r.n, y: r.val_bpb, d: r.description, st: r.status };
      if (r.val_bpb === null) groups.none.push({ ...point, y: lo === null ? 0.5 : lo + 0.015 * (hi - lo) });
      else if (hi !== null && r.val_bpb > hi) groups.off.push({ ...point, y: hi - 0.01 * (hi - lo) });
      else if (r.kind === "baseline") groups.baseline.push(point);
      else if (r.kind === "keep") groups.keep.push(point);
      else if (r.kind === "transfer") groups.transfer.push(point);
      else groups.discard.push(point);
    }
    const lastN = rows.length ? rows[rows.length - 1].n : 0;
    const best = [];
    rows.forEach((r, i) => { const b = p.running_best[i]; if (b !== null) best.push({ x: r.n, y: b }); });
    if (best.length) best.push({ x: lastN + 0.5, y: best[best.length - 1].y });
    const ds = [
      { label: "discarded", data: groups.discard, backgroundColor: "rgba(158,158,158,0.7)", borderColor: "rgba(158,158,158,0.7)", pointRadius: 3.5 },
      { label: "kept change", data: groups.keep, backgroundColor: COLORS.keep, borderColor: COLORS.keepDark, pointRadius: 6, borderWidth: 1 },
      { label: "baseline run", data: groups.baseline, backgroundColor: COLORS.keepDark, borderColor: COLORS.keepDark, pointStyle: "rect", pointRadius: 5.5 },
      { label: "running best", data: best, borderColor: COLORS.keep, backgroundColor: COLORS.keep, showLine: true, stepped: "before", pointRadius: 0, borderWidth: 2 },
    ];
    if (groups.transfer.length) ds.push({ label: "transferred config", data: groups.transfer, backgroundColor: COLORS.transfer, borderColor: COLORS.transfer, pointStyle: "rectRot", pointRadius: 6 });
    if (hold.length) ds.push({ label: "holdout_bpb", data: hold.map((r) => ({ x: r.n, y: r.holdout_bpb, d: r.description, st: "holdout" })),
                               backgroundColor: "rgba(0,0,0,0)", borderColor: COLORS.holdout, pointStyle: "triangle", pointRadius: 5, borderWidth: 1.5 });
    if (groups.none.length) ds.push({ label: "no val_bpb (crash, abort, rejected)", data: groups.none, backgroundColor: COLORS.crash, borderColor: COLORS.crash, pointStyle: "crossRot", pointRadius: 6, borderWidth: 2 });
    if (groups.off.length) ds.push({ label: "off scale (above)", data: groups.off, backgroundColor: COLORS.discard, borderColor: COLORS.discard, pointStyle: "triangle", pointRadius: 4 });
    const opts = baseOptions(p.x_label, "val_bpb");
    if (lo !== null) { const pad = 0.04 * (hi - lo || 1e-3); opts.scales.y.min = lo - pad; opts.scales.y.max = hi + pad; }
    opts.scales.x.ticks = { precision: 0 };
    opts.plugins.tooltip.callbacks = {
      label: (ctx) => {
        const r = ctx.raw;
        if (r.d === undefined) return `running best ${bpb(r.y)}`;
        const v = r.st === "holdout" ? `holdout ${bpb(r.y)}` : rows.find((x) => x.n === r.x && x.description === r.d)?.val_bpb;
        return `#${r.x} ${r.st}: ${typeof v === "number" ? bpb(v) : v || ""} · ${r.d}`.slice(0, 160);
      },
    };
    upsert("progress", "progress-chart", "scatter", ds, opts);
  }

  // ---- the results table -------------------------------------------------------------
  function renderTable(s) {
    const key = JSON.stringify(s.rows);
    if (key === lastRowsKey) return;
    lastRowsKey = key;
    const tbody = $("results").tBodies[0];
    tbody.replaceChildren();
    for (const r of [...s.rows].reverse()) {
      const delta = r.delta === null ? "—" : signed(r.delta);
      const tr = el("tr", { class: "row" + (openRun === r.run && r.run !== null ? " open" : ""), "data-run": r.run, "data-n": r.n },
        el("td", { class: "num", text: String(r.n) }),
        el("td", {}, el("span", { class: `st ${r.kind}`, text: r.kind === "baseline" ? "baseline" : r.status,
                                  title: r.reason || null })),
        el("td", { text: r.description }),
        el("td", { class: "num", text: r.val_bpb === null ? "—" : bpb(r.val_bpb) }),
        el("td", { class: "num " + (r.delta === null ? "" : r.delta < 0 ? "good" : "bad"), text: delta }),
        el("td", { class: "num", text: r.holdout_bpb ? bpb(r.holdout_bpb) : "—" }),
        el("td", { class: "num", text: r.memory_gb ? r.memory_gb.toFixed(1) : "—" }),
        el("td", { class: "num", text: r.steps === null ? "—" : String(r.steps) }),
        el("td", { class: "num", text: r.cost_usd === null ? "—" : r.cost_usd.toFixed(4) }),
        el("td", { class: "note", text: r.note, title: r.note }));
      tr.addEventListener("click", () => toggle(r));
      tbody.append(tr);
      if (openRun !== null && r.run === openRun) tbody.append(detailRow(r));
    }
  }

  function toggle(r) {
    openRun = openRun === r.run ? null : r.run;
    lastRowsKey = null;
    renderTable(state);
    if (openRun !== null) { load(r, "diff"); load(r, "log"); }
  }

  function detailRow(r) {
    const td = el("td", { colspan: "10" });
    if (r.run === null) {
      td.append(el("p", { class: "muted", text: "This row has no run number (a reference-format results file): no runs/<n> to open." }));
    } else {
      const grid = el("div", { class: "detail-grid" });
      for (const kind of ["diff", "log"]) {
        const pre = el("pre", { class: kind, id: `detail-${kind}` });
        fill(pre, r, kind);
        grid.append(el("div", {}, el("h3", { text: kind === "diff" ? `runs/${r.run}/diff.patch` : `runs/${r.run}/log.txt (tail)` }), pre));
      }
      if (r.note) td.append(el("p", { class: "muted", text: r.note }));
      td.append(grid);
    }
    return el("tr", { class: "detail" }, td);
  }

  async function load(r, kind) {
    const k = `${r.run}/${kind}`;
    if (!texts.has(k) || texts.get(k).error || kind === "log") {
      try {
        const resp = await fetch(`api/runs/${encodeURIComponent(r.run)}/${kind}`, { cache: "no-store" });
        const body = await resp.json();
        texts.set(k, resp.ok ? body : { error: body.error || `HTTP ${resp.status}` });
      } catch (e) {
        texts.set(k, { error: String(e) });
      }
    }
    const pre = $(`detail-${kind}`);
    if (pre && openRun === r.run) fill(pre, r, kind);
  }

  function fill(pre, r, kind) {
    const t = texts.get(`${r.run}/${kind}`);
    pre.replaceChildren();
    if (!t) { pre.textContent = "loading…"; return; }
    if (t.error) { pre.textContent = t.error; return; }
    if (kind === "diff") {
      if (!t.text.trim()) { pre.textContent = "(empty: the kept trainer ran unchanged)"; return; }
      for (const line of t.text.split("\n")) {
        const cls = line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ") ? "meta"
          : line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : null;
        pre.append(el("span", { class: cls, text: line + "\n" }));
      }
      if (t.cut) pre.append(el("span", { class: "meta", text: "… (cut: the diff is longer)\n" }));
    } else {
      pre.textContent = (t.cut ? "…\n" : "") + t.text;
      pre.scrollTop = pre.scrollHeight;
    }
  }

  // ---- noise and host -----------------------------------------------------------------
  function renderNoise(s) {
    const n = s.noise || {};
    facts("noise", [
      ["σ the rule uses", n.sigma !== undefined ? n.sigma.toFixed(6) : null, n.describe],
      ["measured σ", n.measured === null || n.measured === undefined ? "none yet: no trainer has run twice" : `${n.measured.toFixed(6)} (${n.runs} runs of ${n.groups} trainer${n.groups === 1 ? "" : "s"}, ${n.df} df)`],
      ["floor (--min-noise)", n.min_noise !== undefined ? String(n.min_noise) : null],
      ["baseline spread", n.baseline_spread !== null && n.baseline_spread !== undefined ? n.baseline_spread.toFixed(6) : null, "max − min of the baseline runs"],
      ["step count explains", n.step_share !== null && n.step_share !== undefined ? `${Math.round(100 * n.step_share)}% of it` : null],
      ["best (mean of its runs)", n.best_mean !== undefined && n.best_mean !== null ? `${bpb(n.best_mean)} over ${n.best_runs} run${n.best_runs === 1 ? "" : "s"}` : null],
      ["early abort", n.abort_off ? "off until the best changes (an audit failed)" : n.would_abort ? `${n.would_abort} run(s) stopped or audited since the best last changed` : null],
      ["keeps", n.out_of_reach || null],
    ]);
    const h = s.host || {};
    facts("hostfacts", [
      ["device", h.device], ["backend", h.backend], ["protocol", h.protocol], ["evaluator", h.evaluator],
      ["branch", h.branch], ["rows of other branches", h.left_out ? `${h.left_out} (not shown)` : null],
      ["results file", s.server && s.server.results], ["served by", s.server && s.server.machine],
      ["loop", s.loop ? (s.loop.running ? `running (pid ${s.loop.pid})` : "not running") : null],
      ["other machines", h.others || null, "the best per hardware class across the machines sharing through the git remote (loop.py run --remote); theirs are their own claims"],
    ]);
  }

  // ---- compare ---------------------------------------------------------------------------
  function renderCompare(s) {
    const c = s.compare;
    $("compare-panel").hidden = !c;
    if (!c) return;
    const key = JSON.stringify(c);
    if (key === lastCompareKey) return;
    lastCompareKey = key;
    const msgs = [...(c.errors || [])];
    if (c.refused) msgs.unshift(c.refused);
    const m = $("compare-msg");
    m.hidden = !msgs.length;
    m.textContent = msgs.join(" ");
    const table = $("compare");
    table.tHead.replaceChildren();
    table.tBodies[0].replaceChildren();
    if (c.sources.length < 2) { if (charts.compare) { charts.compare.destroy(); charts.compare = null; } return; }
    table.tHead.append(el("tr", {}, el("th", { text: "" }), ...c.sources.map((x) => el("th", { text: x.label }))));
    const low = Math.min(...c.sources.map((x) => x.best_bpb ?? Infinity));
    const num = (v, d) => (v === null || v === undefined ? "—" : v.toFixed(d));
    const lines = [
      ["best val_bpb", c.sources.map((x) => bpb(x.best_bpb)), c.sources.map((x) => x.best_bpb === low)],
      ["holdout_bpb", c.sources.map((x) => bpb(x.holdout_bpb))],
      ["baseline val_bpb", c.sources.map((x) => bpb(x.baseline_bpb))],
      ["gain over baseline", c.sources.map((x) => pct(x.gain_pct) || "—")],
      ["experiments (kept)", c.sources.map((x) => `${x.experiments} (${x.kept})`)],
      ["steps", c.sources.map((x) => (x.steps === null ? "—" : String(x.steps)))],
      ["tokens (M)", c.sources.map((x) => num(x.tokens_M, 1))],
      ["MFU %", c.sources.map((x) => num(x.mfu, 2))],
      ["memory (GB)", c.sources.map((x) => num(x.memory_gb, 1))],
      ["backend", c.sources.map((x) => x.backend || "—")],
      ["change", c.sources.map((x) => x.change || "—")],
    ];
    const body = table.tBodies[0];
    for (const [name, values, best] of lines) {
      body.append(el("tr", {}, el("th", { text: name }), ...values.map((v, i) => el("td", { class: best && best[i] ? "best" : null, text: v }))));
    }
    for (const hp of c.hyperparams) {
      body.append(el("tr", {}, el("th", { text: hp.name + (hp.differs ? " ≠" : "") }),
        ...hp.values.map((v) => el("td", { class: hp.differs ? "differs" : null, text: v }))));
    }
    const ds = c.sources.map((x, i) => ({
      label: x.label, borderColor: PALETTE[i % PALETTE.length], backgroundColor: PALETTE[i % PALETTE.length],
      data: x.running_best.map((y, k) => ({ x: k + 1, y })).filter((p) => p.y !== null),
      showLine: true, stepped: "before", pointRadius: 0, borderWidth: 2,
    }));
    const opts = baseOptions("experiments on the branch", "best so far vs own baseline (%)");
    upsert("compare", "compare-chart", "scatter", ds, opts);
  }

  // ---- charts ------------------------------------------------------------------------------
  function baseOptions(xTitle, yTitle) {
    return {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
      interaction: { mode: "nearest", intersect: false },
      scales: { x: { type: "linear", title: { display: true, text: xTitle } }, y: { type: "linear", title: { display: true, text: yTitle } } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12, font: { size: 11 } } }, tooltip: { callbacks: {} } },
    };
  }

  function upsert(name, canvasId, type, datasets, options) {
    if (typeof Chart === "undefined") return;  // the vendored file is missing: the tables still work
    const ch = charts[name];
    if (ch) {
      ch.data.datasets = datasets;
      ch.options = options;
      ch.update("none");
    } else {
      charts[name] = new Chart($(canvasId), { type, data: { datasets }, options });
    }
  }

  poll();
})();
