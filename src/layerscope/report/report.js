// The report page: the inspector's view of one capture, with no kernel and nothing fetched. The data sits
// in the page (see report/html.py for the layout); the module tree is the notebook widget's own tree.js,
// imported from a blob: URL and driven by a small stand-in for anywidget's model. Strings from the model
// only ever reach the page through textContent or attribute values; pictures are drawn with DOM, SVG and
// canvas calls.

const TABS = ["Activations", "Feature maps", "Gradients", "Explain", "Findings", "Summary"];
const SVG = "http://www.w3.org/2000/svg";
const MAP_COLUMNS = 8; // as plots.feature_maps lays tiles out
const MAP_WIDTH = 640; // px: the widest the feature maps are drawn

function make(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function shape(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function table(pairs, cls, head) {
  const t = make("table", `ls-table ${cls || ""}`);
  if (head) {
    const tr = make("tr");
    for (const h of head) tr.append(make("th", "", h));
    t.append(tr);
  }
  for (const row of pairs) {
    const tr = make("tr");
    if (head) for (const v of row) tr.append(make("td", "", v));
    else tr.append(make("th", "", row[0]), make("td", "", row[1]));
    t.append(tr);
  }
  return t;
}

function note(text, warn) {
  return make("div", warn ? "ls-note ls-warn" : "ls-note", text);
}

function fmt(v) {
  return v === null ? "?" : String(Number(v.toPrecision(4)));
}

// -- the data ----------------------------------------------------------------------------------------

function base64Bytes(text) {
  const raw = atob(text.trim());
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

async function payload(id) { // the bytes of a data element, decompressed
  const el = document.getElementById(id);
  const encoding = el.dataset.encoding;
  if (encoding === "json") return new TextEncoder().encode(el.textContent);
  const bytes = base64Bytes(el.textContent);
  if (encoding === "base64") return bytes;
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// A stand-in for anywidget's model (get/set/on/off/save_changes/send): set() fires "change:<key>" at once,
// as the notebook's model does for changes made in the page; send() hands the message to the page.
function stubModel(state, onMessage) {
  const handlers = new Map();
  return {
    get: (key) => state[key],
    set(key, value) {
      if (state[key] === value) return;
      state[key] = value;
      for (const f of [...(handlers.get(`change:${key}`) || [])]) f(null, value);
    },
    on(event, f) {
      if (!handlers.has(event)) handlers.set(event, new Set());
      handlers.get(event).add(f);
    },
    off(event, f) {
      if (handlers.has(event)) handlers.get(event).delete(f);
    },
    save_changes() {},
    send(content) { onMessage(content); },
  };
}

// -- pictures --------------------------------------------------------------------------------------

function histogram(h) {
  const W = 640, H = 230, left = 60, right = 14, top = 26, bottom = 34;
  const n = h.counts.length;
  let edges = h.edges;
  if (edges.length === 2 && n > 1) {
    const [lo, hi] = edges;
    edges = Array.from({ length: n + 1 }, (_, i) => lo + ((hi - lo) * i) / n);
  }
  const lo = edges[0], hi = edges[n];
  const most = h.counts.reduce((a, b) => Math.max(a, b), 0) || 1;
  const x = (v) => left + ((v - lo) / (hi - lo || 1)) * (W - left - right);
  const y = (c) => top + (1 - c / most) * (H - top - bottom);
  const svg = shape("svg", { class: "ls-histogram", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  svg.setAttribute("aria-label", h.title);
  svg.append(shape("text", { x: left, y: 16, class: "ls-svg-title" }, h.title));
  h.counts.forEach((c, i) => {
    const x0 = x(edges[i]), x1 = x(edges[i + 1]);
    const bar = shape("rect", { x: x0, y: y(c), width: Math.max(x1 - x0 - 0.5, 0.5), height: y(0) - y(c),
      class: "ls-bar" });
    bar.dataset.count = String(c);
    bar.append(shape("title", {}, `[${fmt(edges[i])}, ${fmt(edges[i + 1])}): ${c.toLocaleString("en-US")}`));
    svg.append(bar);
  });
  svg.append(shape("line", { x1: left, x2: W - right, y1: y(0), y2: y(0), class: "ls-axis" }));
  svg.append(shape("line", { x1: left, x2: left, y1: top, y2: y(0), class: "ls-axis" }));
  [[lo, "start"], [(lo + hi) / 2, "middle"], [hi, "end"]].forEach(([v, anchor]) => {
    svg.append(shape("text", { x: x(v), y: H - bottom + 16, "text-anchor": anchor, class: "ls-tick" }, fmt(v)));
  });
  svg.append(shape("text", { x: left - 6, y: top + 4, "text-anchor": "end", class: "ls-tick" },
    most.toLocaleString("en-US")));
  svg.append(shape("text", { x: left - 6, y: y(0), "text-anchor": "end", class: "ls-tick" }, "0"));
  svg.append(shape("text", { x: (left + W - right) / 2, y: H - 4, "text-anchor": "middle", class: "ls-tick" },
    "value"));
  return svg;
}

const FLOW_LABELS = { vanishing_grad: "vanishing", exploding_grad: "exploding", zero: "zero gradient",
  nonfinite: "NaN/Inf gradient", none: "no gradient", frozen: "frozen" };

function owns(module, name) { // as core/gradflow.py: the layer is the module or inside it
  return name === module || (module !== "" && name.startsWith(`${module}.`));
}

// Per-layer gradient norms on a log axis, one row per layer in execution order from the top, as
// plots.gradient_flow draws them: module names on the left (thinned on large models, the selected block's first
// layer always named), layers named by vanishing/exploding findings coloured, layers without a norm marked at
// the left edge, ``selected`` shaded.
function gradientFlow(g, selected) {
  const W = 640, left = 170, right = 14, top = 30, bottom = 40, label = 14; // px per name, at least
  const n = g.layers.length;
  const rowH = n ? Math.max(3, Math.min(16, 640 / n)) : 0;
  const H = n ? top + n * rowH + bottom : 120;
  const svg = shape("svg", { class: "ls-gradient-flow", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  svg.setAttribute("aria-label", g.title);
  svg.append(shape("text", { x: 4, y: 16, class: "ls-svg-title" }, g.title));
  if (!n) {
    svg.append(shape("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "ls-tick" }, g.why));
    return svg;
  }
  const y = (i) => top + (i + 0.5) * rowH;
  const norms = g.layers.map((l) => l[1]).filter((v) => v !== null);
  const lo = norms.length ? Math.log10(Math.min(...norms) / 3) : -8;
  const hi = norms.length ? Math.log10(Math.max(...norms) * 3) : 0;
  const x = (v) => left + ((Math.log10(v) - lo) / (hi - lo)) * (W - left - right);
  const inside = g.layers.map((l, i) => (owns(selected, l[0]) ? i : -1)).filter((i) => i >= 0);
  if (inside.length) {
    svg.append(shape("rect", { x: left, y: y(inside[0]) - rowH / 2, width: W - left - right,
      height: (inside[inside.length - 1] - inside[0] + 1) * rowH, class: "ls-highlight" }));
  }
  const step = Math.max(1, Math.ceil((hi - lo) / 6)); // decades between labelled grid lines
  for (let k = Math.ceil(lo / step) * step; k <= Math.floor(hi); k += step) {
    svg.append(shape("line", { x1: x(10 ** k), x2: x(10 ** k), y1: top, y2: H - bottom, class: "ls-grid" }));
    svg.append(shape("text", { x: x(10 ** k), y: H - bottom + 14, "text-anchor": "middle", class: "ls-tick" },
      `1e${k}`));
  }
  const every = Math.ceil(label / rowH); // rows between names
  const named = new Set();
  for (let i = 0; i < n; i += every) named.add(i);
  if (inside.length && !named.has(inside[0])) {
    const near = Math.round(inside[0] / every) * every;
    named.delete(Math.min(near, Math.floor((n - 1) / every) * every));
    named.add(inside[0]);
  }
  const seen = new Set();
  g.layers.forEach(([name, norm, why, kind], i) => {
    const text = name || "(model)";
    if (named.has(i)) {
      svg.append(shape("text", { x: left - 6, y: y(i) + 4, "text-anchor": "end", class: "ls-tick ls-layer" }, text));
    }
    let mark;
    if (norm !== null) {
      svg.append(shape("line", { x1: left, x2: x(norm), y1: y(i), y2: y(i),
        class: `ls-stem ls-dot-${kind || "normal"}` }));
      mark = shape("circle", { cx: x(norm), cy: y(i), r: 3, class: `ls-dot ls-dot-${kind || "normal"}` });
      mark.dataset.norm = String(norm);
      mark.append(shape("title", {}, `${text}: ${fmt(norm)}`));
      if (kind) seen.add(kind);
    } else {
      mark = shape("text", { x: left + 6, y: y(i) + 4, "text-anchor": "middle", class: `ls-miss ls-miss-${why}` },
        "×");
      mark.append(shape("title", {}, `${text}: ${FLOW_LABELS[why]}`));
      seen.add(why);
    }
    mark.dataset.name = name;
    svg.append(mark);
  });
  svg.append(shape("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "ls-axis" }));
  svg.append(shape("text", { x: W / 2, y: H - 8, "text-anchor": "middle", class: "ls-tick" },
    `gradient norm (log scale) of the ${n} layers with parameters, in execution order from the top`));
  let at = W - right;
  for (const key of [...seen].reverse()) {
    const t = shape("text", { x: at, y: 16, "text-anchor": "end", class: `ls-tick ls-key-${key}` }, FLOW_LABELS[key]);
    svg.append(t);
    at -= FLOW_LABELS[key].length * 6.5 + 12;
  }
  return svg;
}

function colours(lut) {
  return base64Bytes(lut);
}

function featureMaps(fm, bytes, lut) {
  const [c, h, w] = fm.shape;
  const cols = Math.min(MAP_COLUMNS, c), rows = Math.ceil(c / cols);
  const gap = Math.max(1, Math.round(Math.max(h, w) / 16));
  const width = cols * (w + gap) - gap, height = rows * (h + gap) - gap;
  const tiles = make("canvas");
  tiles.width = width;
  tiles.height = height;
  const image = tiles.getContext("2d").createImageData(width, height); // transparent between tiles
  for (let k = 0; k < c; k++) {
    const top = Math.floor(k / cols) * (h + gap), left = (k % cols) * (w + gap);
    const base = fm.offset + k * h * w;
    for (let r = 0; r < h; r++) {
      for (let q = 0; q < w; q++) {
        const v = bytes[base + r * w + q] * 3, p = ((top + r) * width + left + q) * 4;
        image.data[p] = lut[v];
        image.data[p + 1] = lut[v + 1];
        image.data[p + 2] = lut[v + 2];
        image.data[p + 3] = 255;
      }
    }
  }
  tiles.getContext("2d").putImageData(image, 0, 0);
  const scale = Math.max(1, Math.floor(MAP_WIDTH / width));
  const shown = make("canvas", "ls-feature-maps");
  shown.width = width * scale;
  shown.height = height * scale;
  const ctx = shown.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tiles, 0, 0, shown.width, shown.height);
  if (Math.min(h, w) * scale >= 16) { // channel numbers, as in the notebook's picture
    ctx.font = "10px sans-serif";
    ctx.textBaseline = "top";
    for (let k = 0; k < c; k++) {
      const top = Math.floor(k / cols) * (h + gap) * scale, left = (k % cols) * (w + gap) * scale;
      const label = String(k), size = ctx.measureText(label).width;
      ctx.fillStyle = "rgba(255, 255, 255, 0.7)";
      ctx.fillRect(left, top, size + 4, 12);
      ctx.fillStyle = "#000";
      ctx.fillText(label, left + 2, top + 1);
    }
  }
  shown.setAttribute("role", "img");
  shown.setAttribute("aria-label", fm.title);
  return shown;
}

function colourBar(fm, lut) {
  const bar = make("canvas", "ls-colour-bar");
  bar.width = 256;
  bar.height = 1;
  const ctx = bar.getContext("2d"), image = ctx.createImageData(256, 1);
  for (let i = 0; i < 256; i++) {
    image.data.set([lut[i * 3], lut[i * 3 + 1], lut[i * 3 + 2], 255], i * 4);
  }
  ctx.putImageData(image, 0, 0);
  const box = make("div", "ls-colour-scale");
  box.append(make("span", "", fmt(fm.lo)), bar, make("span", "", fmt(fm.hi)));
  return box;
}

// -- the page --------------------------------------------------------------------------------------

async function main() {
  const root = document.getElementById("ls-report");
  const doc = JSON.parse(new TextDecoder().decode(await payload("ls-data")));
  let maps = null; // the feature maps' bytes, decoded when first shown
  const luts = {};
  const index = new Map(doc.tree.rows.map((r, i) => [r[0], i]));

  const head = make("div", "ls-report-head");
  head.append(make("h1", "ls-report-title", doc.title), make("div", "ls-note", doc.subtitle));
  const banner = make("div", "ls-banner");
  if (doc.error) {
    const b = make("div", "ls-error-banner");
    b.append(make("b", "", doc.error.lead), " ", doc.error.message);
    banner.append(b);
  }
  const treeEl = make("div", "ls-report-tree");
  const header = make("div", "ls-header");
  const bar = make("div", "ls-tabs");
  bar.setAttribute("role", "tablist");
  const panel = make("div", "ls-tab-panel");
  const right = make("div", "ls-panel");
  right.append(header, bar, panel);
  const body = make("div", "ls-report-body");
  body.append(treeEl, right);
  root.replaceChildren(head, banner, body);

  let tab = 0, call = 0;
  const buttons = TABS.map((title, i) => {
    const b = make("button", "ls-tab", title);
    b.setAttribute("role", "tab");
    b.addEventListener("click", () => {
      tab = i;
      draw();
    });
    return b;
  });
  bar.append(...buttons);

  const model = stubModel({ rows: doc.tree.rows, selected: doc.tree.selected, marked: doc.tree.marked,
    expanded: doc.tree.expanded }, () => {});
  const current = () => doc.modules[index.get(model.get("selected"))];

  function drawHeader(m) {
    const title = make("div", "ls-title");
    title.append(make("span", "ls-name", m.title), " ", make("span", "ls-type", m.type));
    const parts = [title];
    if (m.calls.length > 1) {
      const pick = make("select", "ls-call");
      pick.setAttribute("aria-label", "Call");
      m.calls.forEach((_, i) => pick.append(new Option(`call ${i + 1} of ${m.calls.length}`, String(i))));
      pick.value = String(call);
      pick.addEventListener("change", () => {
        call = Number(pick.value);
        draw();
      });
      parts.push(pick);
    }
    parts.push(table(m.calls.length ? m.calls[call].header : m.header, "ls-header-table"));
    header.replaceChildren(...parts);
  }

  function activations(m, c) {
    if (!c) return [note("This module was never called in this pass.")];
    if (!c.stats) return [note("This call has no floating-point output.")];
    const out = [];
    if (c.hist) {
      out.push(histogram(c.hist));
      if (c.hist.warn) out.push(note(c.hist.warn, true));
      for (const n of c.hist.notes) out.push(note(n));
    }
    out.push(table(c.stats, "ls-stats"));
    return out;
  }

  async function featureMapsTab(m, c) {
    if (!c || !c.maps) return [note("This module has no spatial (N, C, H, W) output to show.")];
    if (maps === null) maps = await payload("ls-maps");
    if (!luts[c.maps.cmap]) luts[c.maps.cmap] = colours(doc.colormaps[c.maps.cmap]);
    const lut = luts[c.maps.cmap];
    return [note(`${c.maps.title}. The report holds the sample the capture stored; the other channels and ` +
      "items need the model."), featureMaps(c.maps, maps, lut), colourBar(c.maps, lut)];
  }

  function gradients(m, c) {
    if (!doc.backward) {
      return [note("No gradients: the capture ran without a backward pass, or the pass failed before it.")];
    }
    const out = [m.grads.length ? table(m.grads, "ls-grads", ["parameter", "grad norm", "norm", "grad / norm"])
      : note("This module has no parameters of its own.")];
    const pairs = [["output grad norm", c ? c.grad : "-"]];
    if (m.ratio !== null) pairs.push(["layer grad / weight (what the findings judge)", m.ratio]);
    out.push(table(pairs, "ls-out-grad"));
    out.push(gradientFlow(doc.gradient_flow, model.get("selected")));
    return out;
  }

  function explain() {
    if (!doc.explain.length) {
      return [note("Grad-CAM and attention run the model again. This report holds the Grad-CAM the inspector " +
        "had computed at the automatically chosen layer when it was saved, and there was none.")];
    }
    const out = [];
    for (const view of doc.explain) {
      out.push(note(`Grad-CAM at ${view.layer}, the layer chosen automatically, for class ${view.class}`));
      for (const item of view.items) {
        const figure = make("figure", "ls-cam");
        const img = make("img", "ls-explain");
        img.alt = `Grad-CAM of item ${item.item} for class ${view.class}`;
        img.src = item.image;
        figure.append(img, make("figcaption", "ls-note", `item ${item.item}`));
        if (item.top.length) {
          figure.append(make("b", "", "Top predictions"), table(item.top, "ls-top5"));
        }
        out.push(figure);
      }
    }
    return out;
  }

  let findingsList = null;
  function findings() {
    if (!doc.findings.length) return [note("No findings: nothing in this pass looked wrong.")];
    if (!findingsList) {
      const counts = ["error", "warning", "info"].map(
        (s) => `${doc.findings.filter((f) => f.severity === s).length} ${s}`).join(", ");
      const n = doc.findings.length;
      const list = make("ol", "ls-findings");
      const detail = make("div", "ls-finding-detail");
      doc.findings.forEach((f, i) => {
        const item = make("li");
        const pick = make("button", `ls-finding-item ls-finding-item-${f.severity}`, f.label);
        pick.dataset.index = String(i);
        pick.addEventListener("click", () => {
          const badge = make("span", `ls-finding ls-finding-${f.severity}`, f.severity);
          detail.replaceChildren(badge, " ", make("span", "ls-kind", f.kind), `: ${f.message}`);
          if (f.modules.length > 1) detail.append(make("div", "ls-finding-modules", `Modules: ${f.modules.join(", ")}`));
          if (f.fix) detail.append(make("div", "ls-fix", f.fix));
          if (index.has(f.module)) model.set("selected", f.module);
          list.querySelectorAll(".ls-picked").forEach((e) => e.classList.remove("ls-picked"));
          pick.classList.add("ls-picked");
        });
        item.append(pick);
        list.append(item);
      });
      findingsList = [note(`${n} finding${n === 1 ? "" : "s"} (${counts}); pick one to select its module.`),
        list, detail];
    }
    return findingsList;
  }

  function summary() {
    return [make("pre", "ls-summary", doc.summary)];
  }

  let drawing = 0;
  async function draw() {
    const ticket = ++drawing;
    const m = current();
    call = Math.min(call, Math.max(m.calls.length - 1, 0));
    const c = m.calls[call];
    drawHeader(m);
    buttons.forEach((b, i) => {
      b.classList.toggle("ls-tab-active", i === tab);
      b.setAttribute("aria-selected", String(i === tab));
    });
    const parts = await [() => activations(m, c), () => featureMapsTab(m, c), () => gradients(m, c), explain,
      findings, summary][tab]();
    if (ticket === drawing) panel.replaceChildren(...parts); // a later click wins
  }

  model.on("change:selected", () => {
    call = 0;
    draw();
  });
  const src = document.getElementById("ls-tree-js").textContent;
  const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
  const tree = (await import(url)).default;
  URL.revokeObjectURL(url);
  tree.render({ model, el: treeEl });
  await draw();
  requestAnimationFrame(() => {
    document.documentElement.dataset.lsReady = String(Math.round(performance.now()));
  });
}

main().catch((error) => {
  const root = document.getElementById("ls-report");
  root.replaceChildren(make("div", "ls-error-banner", `This report could not be shown: ${error}`));
  throw error;
});
