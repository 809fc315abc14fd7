"""The style sheet and the script of the HTML report, inlined into the page.

The script reads the page's data (a ``<script type="application/json">`` element) and renders
the per-sample table (sort, filter, search, pages) and the flips between two evaluations. It
builds every element with ``textContent``: no text of a record is ever parsed as HTML.
"""

from __future__ import annotations

__all__ = ["SCRIPT", "STYLE"]

STYLE = """
:root {
  --text: #1f2328; --muted: #59636e; --line: #d0d7de; --soft: #f6f8fa; --accent: #0969da;
  --good: #1a7f37; --bad: #cf222e;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--text); background: #fff;
}
body { margin: 0; padding: 24px 32px 48px; font-size: 14px; line-height: 1.45; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 8px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 8px; }
p { margin: 6px 0; }
code, .mono, .txt {
  font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, monospace; }
.muted { color: var(--muted); }
.sub { color: var(--muted); margin-bottom: 16px; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px;
  margin: 8px 0; max-width: 1100px; }
.warn ul { margin: 4px 0; padding-left: 20px; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: flex-start; }
.chart { background: #fff; }
.chart .grid { stroke: #eaeef2; }
.chart .axis { stroke: #8c959f; }
.chart .tick { font-size: 11px; fill: var(--muted); }
.chart .chart-title { font-size: 13px; font-weight: 600; fill: var(--text); }
.chart .axis-label { font-size: 11px; fill: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 4px 0 8px; color: var(--muted); }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.legend svg { display: block; }
table { border-collapse: collapse; }
.summary td, .summary th { padding: 3px 10px; border-bottom: 1px solid var(--line); }
.summary th { text-align: left; background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; margin: 8px 0; }
.controls label { color: var(--muted); }
select, input, button { font: inherit; padding: 3px 6px; border: 1px solid var(--line);
  border-radius: 6px; background: #fff; color: var(--text); }
input[type=search] { width: 220px; }
button { cursor: pointer; background: var(--soft); }
button:disabled { cursor: default; color: #8c959f; }
.count { margin: 6px 0; }
.marks { max-width: 1100px; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
.samples { width: 100%; }
.samples th { position: sticky; top: 0; background: var(--soft); text-align: left;
  font-weight: 600; white-space: nowrap; border-bottom: 1px solid var(--line); padding: 0; }
.samples th:not(:has(button)) { padding: 6px 8px; }
.samples th button { border: 0; background: none; padding: 6px 8px; font-weight: 600;
  width: 100%; text-align: inherit; border-radius: 0; }
.samples th.num button { text-align: right; }
.samples th[aria-sort=ascending] button::after { content: " \\25B2"; color: var(--accent); }
.samples th[aria-sort=descending] button::after { content: " \\25BC"; color: var(--accent); }
.samples td { padding: 4px 8px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
.samples tbody tr:hover { background: #f6f8fa; }
.txt { white-space: pre-wrap; word-break: break-all; min-width: 10ch; max-width: 44ch; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px;
  font-weight: 600; white-space: nowrap; }
.badge.right { background: #dafbe1; color: var(--good); }
.badge.wrong { background: #ffebe9; color: var(--bad); }
.badge.none { background: var(--soft); color: var(--muted); }
.badge.differs { outline: 2px solid #bf8700; }
mark { background: none; color: inherit; border-radius: 2px; }
mark.bad { background: #ffcecb; color: #a40e26; font-weight: 700;
  text-decoration: underline 2px #cf222e; text-underline-offset: 2px; }
mark.missing { background: #fff1c2; color: #9a6700; outline: 1px dashed #bf8700; }
mark.extra { background: #e6d7ff; color: #512a97; text-decoration: line-through; }
.pager { display: flex; gap: 8px; align-items: center; margin: 8px 0; }
.flip-counts { font-weight: 600; margin: 8px 0; }
.empty { color: var(--muted); padding: 10px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

SCRIPT = r"""
"use strict";
(() => {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const $ = (id) => document.getElementById(id);
  if (!DATA.evalSets.length) {
    $("count").textContent = "No records to show.";
    document.body.dataset.ready = "true";
    return;
  }
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  };
  const num = (v) => (typeof v === "string" ? Number(v) : v); // "NaN", "Infinity"
  const missing = (v) => v === null || v === undefined || (typeof v === "number" && isNaN(v));
  const fixed = (v) => (missing(v) ? "\u2013" : v.toFixed(3));
  const count = (n) => n.toLocaleString("en-US");
  const VISIBLE = { " ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d" };
  const shown = (c) => VISIBLE[c] || c;
  const FLIP_CAP = 200;

  // Character-level marks on decoded text: position by position against the reference.
  function marked(text, reference) {
    const out = el("span", "txt");
    if (text === null) return out;
    if (reference === null) { out.textContent = text; return out; }
    const a = Array.from(text), b = Array.from(reference);
    let plain = "";
    const flush = () => { if (plain) { out.append(plain); plain = ""; } };
    const mark = (cls, c, hint) => {
      flush();
      const m = el("mark", cls, shown(c));
      m.title = hint;
      out.append(m);
    };
    for (let k = 0; k < Math.max(a.length, b.length); k++) {
      if (k < a.length && k < b.length) {
        if (a[k] === b[k]) plain += a[k];
        else mark("bad", a[k], "position " + (k + 1) + ": expected " + JSON.stringify(b[k]));
      } else if (k < a.length) {
        mark("extra", a[k], "position " + (k + 1) + ": extra, past the reference's end");
      } else {
        mark("missing", b[k], "position " + (k + 1) + ": missing " + JSON.stringify(b[k]));
      }
    }
    flush();
    return out;
  }

  function badge(value, differs) {
    if (value === null || value === undefined) return el("span", "badge none", "\u2013");
    const b = el("span", "badge " + (value ? "right" : "wrong"), value ? "right" : "wrong");
    if (differs) { b.classList.add("differs"); b.title = "differs from teacher-forced"; }
    return b;
  }

  function rowsOf(setIdx, evIdx) {
    const s = DATA.evalSets[setIdx], e = s.evaluations[evIdx];
    return s.index.map((index, i) => {
      const sup = s.sup[i], cor = e.cor[i];
      return {
        index, sup, cor, wrong: sup - cor, share: sup ? cor / sup : null,
        group: s.group[i] < 0 ? null : s.groups[s.group[i]],
        exact: e.exact[i], nll: e.nll ? num(e.nll[i]) : null,
        genExact: e.genExact ? e.genExact[i] : null,
        prediction: e.pred ? e.pred[i] : null, reference: s.ref ? s.ref[i] : null,
        generated: e.gen ? e.gen[i] : null,
      };
    });
  }

  // Columns: key, header, numeric, shown when the eval set has it, cell.
  const COLUMNS = [
    ["index", "index", true, () => true, (r) => el("span", null, String(r.index))],
    ["group", "group", false, (s) => s.groups.length > 0, (r) => el("span", null, r.group)],
    ["exact", "exact", false, () => true, (r) => r.sup ? badge(r.exact) :
      el("span", "badge none", "no token")],
    ["wrong", "correct / supervised", true, () => true,
      (r) => el("span", "mono", r.cor + "/" + r.sup)],
    ["share", "share", true, () => true, (r) => el("span", "mono", fixed(r.share))],
    ["nll", "NLL", true, (s, e) => e.nll !== null, (r) => el("span", "mono", fixed(r.nll))],
    ["genExact", "generated", false, (s, e) => e.genExact !== null,
      (r) => badge(r.genExact, r.genExact !== null && r.exact !== null && r.genExact !== r.exact)],
    ["prediction", "prediction (teacher-forced)", false, (s, e) => e.pred !== null,
      (r) => marked(r.prediction, r.reference)],
    ["reference", "reference", false, (s) => s.ref !== null,
      (r) => el("span", "txt", r.reference)],
    ["generated", "generated text", false, (s, e) => e.gen !== null,
      (r) => marked(r.generated, r.reference)],
  ];
  const TIPS = {
    wrong: "sorts by the number of wrong tokens (supervised \u2212 correct)",
    exact: "teacher-forced exact match: every supervised token right",
    genExact: "free-running (generated) exact match; outlined where it differs from exact",
    share: "share of the supervised tokens predicted right",
    nll: "the sample's NLL, summed over its supervised tokens",
  };

  const state = {
    set: DATA.start[0], ev: DATA.start[1], key: "index", desc: false,
    group: "", status: "all", query: "", page: 0, size: 100,
  };
  let rows = [], columns = [];

  function key(r) {
    const v = r[state.key];
    if (typeof v === "boolean") return v ? 1 : 0;
    return v;
  }
  function compareRows(a, b) {
    const x = key(a), y = key(b), xm = missing(x), ym = missing(y);
    if (xm !== ym) return xm ? 1 : -1; // no value: last, either way
    if (!xm && x !== y) { const c = x < y ? -1 : 1; return state.desc ? -c : c; }
    return a.index - b.index;
  }
  function matches(r) {
    if (state.group && r.group !== state.group) return false;
    const s = state.status;
    if (s === "wrong" && r.exact !== false) return false;
    if (s === "right" && r.exact !== true) return false;
    if (s === "none" && r.sup !== 0) return false;
    if (s === "gen-wrong" && r.genExact !== false) return false;
    if (s === "gen-differs" &&
        (r.genExact === null || r.exact === null || r.genExact === r.exact)) return false;
    const q = state.query;
    if (q) {
      const inText = [r.prediction, r.reference, r.generated]
        .some((t) => t !== null && t.toLowerCase().includes(q));
      if (!inText && String(r.index) !== q) return false;
    }
    return true;
  }

  function rowElement(r) {
    const tr = el("tr");
    tr.dataset.index = String(r.index);
    for (const [k, , numeric, , cell] of columns) {
      const td = el("td", numeric ? "num" : null);
      td.dataset.col = k;
      td.append(cell(r));
      tr.append(td);
    }
    return tr;
  }

  function header(tableId, sortable) {
    const tr = el("tr");
    for (const [k, title, numeric] of columns) {
      const th = el("th", numeric ? "num" : null);
      th.dataset.key = k;
      if (TIPS[k]) th.title = TIPS[k];
      if (sortable) {
        const b = el("button", null, title);
        b.type = "button";
        b.addEventListener("click", () => {
          if (state.key === k) state.desc = !state.desc;
          else { state.key = k; state.desc = false; }
          state.page = 0;
          renderTable();
        });
        th.append(b);
        if (state.key === k) th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
      } else {
        th.textContent = title;
      }
      tr.append(th);
    }
    $(tableId).querySelector("thead").replaceChildren(tr);
  }

  function selectEvaluation(initial) {
    const s = DATA.evalSets[state.set], e = s.evaluations[state.ev];
    rows = rowsOf(state.set, state.ev);
    columns = COLUMNS.filter((c) => c[3](s, e));
    const groups = $("group");
    groups.replaceChildren(el("option", null, "all groups"));
    groups.firstChild.value = "";
    for (const g of s.groups) { const o = el("option", null, g); o.value = g; groups.append(o); }
    if (!s.groups.includes(state.group)) state.group = "";
    groups.value = state.group;
    groups.disabled = s.groups.length === 0;
    $("eval-file").textContent = e.file;
    state.page = 0;
    renderTable();
    resetFlips(initial);
  }

  function renderTable() {
    header("samples", true);
    const list = rows.filter(matches).sort(compareRows);
    const pages = Math.max(1, Math.ceil(list.length / state.size));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * state.size;
    const page = list.slice(start, start + state.size);
    const body = $("samples").querySelector("tbody");
    body.replaceChildren(...page.map(rowElement));
    if (!page.length) {
      const td = el("td", "empty", "No sample matches these filters.");
      td.colSpan = columns.length;
      const tr = el("tr"); tr.append(td); body.append(tr);
    }
    const label = DATA.evalSets[state.set].evaluations[state.ev].label;
    $("count").textContent = list.length
      ? "Showing " + count(start + 1) + "\u2013" + count(start + page.length) + " of " +
        count(list.length) + " matching samples (" + count(rows.length) + " at " + label + ")"
      : "0 of " + count(rows.length) + " samples at " + label + " match";
    $("page").textContent = "page " + (state.page + 1) + " of " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
  }

  // ---- flips ----
  function resetFlips(initial) {
    const s = DATA.evalSets[state.set];
    const from = $("flip-from"), to = $("flip-to");
    for (const select of [from, to]) {
      select.replaceChildren(...s.evaluations.map((e, i) => {
        const o = el("option", null, e.label); o.value = String(i); return o;
      }));
    }
    // The evaluation above against the one before it in its run (the default pair at first).
    let before = state.ev - 1;
    if (before < 0 || s.evaluations[before].run !== s.evaluations[state.ev].run) {
      before = state.ev;
    }
    const pair = s.flips && (initial || s.flips[1] === state.ev) ? s.flips : [before, state.ev];
    from.value = String(pair[0]);
    to.value = String(pair[1]);
    $("flip-default").textContent = s.flips && pair === s.flips ? s.flipsNote : "";
    renderFlips();
  }

  function flipTable(id, list) {
    const table = $(id);
    table.hidden = list.length === 0;
    header(id, false);
    table.querySelector("tbody").replaceChildren(...list.slice(0, FLIP_CAP).map(rowElement));
  }

  function renderFlips() {
    const s = DATA.evalSets[state.set];
    const i = Number($("flip-from").value), j = Number($("flip-to").value);
    const a = s.evaluations[i], b = s.evaluations[j];
    let lost = [], gained = [], note = "";
    if (s.evaluations.length < 2) {
      note = "Only one evaluation of this eval set: no flips to compare.";
    } else if (i === j) {
      note = "No earlier evaluation of this run: choose two different evaluations.";
    } else if (a.run !== b.run) {
      note = "Not comparable: " + a.label + " is of run " + a.run + " and " + b.label +
        " of run " + b.run + ". Two runs wrote into this folder: a change between them is " +
        "no change of one model's mind.";
    } else {
      const after = rowsOf(state.set, j);
      after.forEach((r, k) => {
        if (a.exact[k] === true && b.exact[k] === false) lost.push(r);
        if (a.exact[k] === false && b.exact[k] === true) gained.push(r);
      });
      note = "Matched by index: " + s.checked + ". Texts and counts of " + b.label + ".";
    }
    const compared = note.startsWith("Matched");
    $("flip-note").textContent = note;
    $("flip-counts").textContent = compared
      ? "right \u2192 wrong: " + count(lost.length) + " \u00b7 wrong \u2192 right: " +
        count(gained.length)
      : "";
    const capped = (list) => list.length > FLIP_CAP
      ? " (the first " + FLIP_CAP + " of " + count(list.length) + ")" : "";
    $("lost-title").textContent = lost.length ? "right \u2192 wrong" + capped(lost) : "";
    $("gained-title").textContent = gained.length ? "wrong \u2192 right" + capped(gained) : "";
    flipTable("lost", lost);
    flipTable("gained", gained);
  }

  // ---- controls ----
  const evaluation = $("evaluation");
  DATA.evalSets.forEach((s, si) => {
    const group = el("optgroup");
    group.label = s.name;
    s.evaluations.forEach((e, ei) => {
      const o = el("option", null, e.label + (s.runs > 1 ? " (run " + e.run + ")" : ""));
      o.value = si + ":" + ei;
      group.append(o);
    });
    evaluation.append(group);
  });
  evaluation.value = state.set + ":" + state.ev;
  evaluation.addEventListener("change", () => {
    [state.set, state.ev] = evaluation.value.split(":").map(Number);
    selectEvaluation(false);
  });
  $("group").addEventListener("change", (ev) => {
    state.group = ev.target.value; state.page = 0; renderTable();
  });
  $("status").addEventListener("change", (ev) => {
    state.status = ev.target.value; state.page = 0; renderTable();
  });
  $("search").addEventListener("input", (ev) => {
    state.query = ev.target.value.trim().toLowerCase(); state.page = 0; renderTable();
  });
  $("page-size").addEventListener("change", (ev) => {
    state.size = Number(ev.target.value); state.page = 0; renderTable();
  });
  $("prev").addEventListener("click", () => { state.page -= 1; renderTable(); });
  $("next").addEventListener("click", () => { state.page += 1; renderTable(); });
  $("flip-from").addEventListener("change", renderFlips);
  $("flip-to").addEventListener("change", renderFlips);
  selectEvaluation(true);
  document.body.dataset.ready = "true";
})();
"""
