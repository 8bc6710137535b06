// The module tree of a ModelInspector. All rows arrive as data in the model's "rows" (see tree.py for
// the fields). Strings from the model only ever reach the page through textContent or attribute values.
// Only the rows in (and near) the scrolled view are in the page, so a tree of any size draws at once.

const NAME = 0, LABEL = 1, TYPE = 2, PARAMS = 3, PARENT = 4, CALLED = 5, ERRORS = 6, WARNINGS = 7;
const PARAMS_VALUE = 8, FLOPS = 9, FLOPS_VALUE = 10, MEMORY = 11, MEMORY_VALUE = 12, INFOS = 13;
// what the number column can show: [text field, value field, menu label, unit for the bar's tooltip]
const COLUMNS = {
  params: [PARAMS, PARAMS_VALUE, "Parameters", "of the parameters"],
  flops: [FLOPS, FLOPS_VALUE, "FLOPs", "of the forward FLOPs"],
  memory: [MEMORY, MEMORY_VALUE, "Activation memory", "of the memory saved for backward"],
};
const NOT_COUNTED = "not counted in this capture: capture(..., costs=True) counts it";
const ROW = 22; // px: the fixed height of a row (.ls-row in tree.css)
const OVERSCAN = 15; // rows kept in the page above and below the view
const VIEW = 560; // px: the list's max-height, used before the list is laid out

function make(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function render({ model, el }) {
  el.classList.add("layerscope-tree");
  el.dataset.lmSuppressShortcuts = "true"; // arrow keys belong to the tree, not to the notebook
  const search = make("input", "ls-search");
  search.type = "search";
  search.placeholder = "Filter by name or type";
  search.setAttribute("aria-label", "Filter modules by name or type");
  const expandAll = make("button", "ls-expand-all", "Expand all");
  const collapseAll = make("button", "ls-collapse-all", "Collapse all");
  const list = make("div", "ls-rows");
  list.tabIndex = 0;
  list.setAttribute("role", "tree");
  const above = make("div"), below = make("div"); // stand-ins for the rows out of view
  const status = make("div", "ls-tree-status");
  const bar = make("div", "ls-tree-bar");
  bar.append(search, expandAll, collapseAll);
  const column = make("select", "ls-column");
  column.setAttribute("aria-label", "What the number column shows");
  for (const [key, [, , label]] of Object.entries(COLUMNS)) {
    const option = make("option", "", label);
    option.value = key;
    column.append(option);
  }
  const sortButton = make("button", "ls-sort", "Sort by size");
  sortButton.title = "Order the modules by the number shown, largest first, within their parent";
  const view = make("div", "ls-tree-bar ls-tree-view");
  view.append(make("span", "ls-view-label", "Show"), column, sortButton);
  el.replaceChildren(bar, view, list, status);

  let rows = [], kids = [], depth = [], lower = [], elems = [], index = new Map(), order = [];
  let visible = [], position = new Map(), matches = null, cursor = 0, inPage = [];
  let open = new Set(model.get("expanded"));

  function shownColumn() {
    return COLUMNS[model.get("column")] || COLUMNS.params;
  }

  function load() {
    rows = model.get("rows");
    index = new Map(rows.map((r, i) => [r[NAME], i]));
    kids = rows.map(() => []);
    depth = rows.map(() => 0);
    rows.forEach((r, i) => {
      if (r[PARENT] >= 0) {
        kids[r[PARENT]].push(i);
        depth[i] = depth[r[PARENT]] + 1;
      }
    });
    lower = rows.map((r) => [r[NAME].toLowerCase(), r[TYPE].toLowerCase()]);
    cursor = Math.min(cursor, Math.max(rows.length - 1, 0));
    for (const option of column.options) { // a cost that was not counted cannot be shown
      const counted = !rows.length || rows[0][COLUMNS[option.value][1]] !== null;
      option.disabled = !counted;
      option.title = counted ? "" : NOT_COUNTED;
    }
    arrange();
  }

  function arrange() { // the display order: children by size (largest first) when sorted, else as defined
    const value = shownColumn()[1];
    const sorted = Boolean(model.get("sorted"));
    column.value = COLUMNS[model.get("column")] ? model.get("column") : "params";
    sortButton.setAttribute("aria-pressed", String(sorted));
    sortButton.classList.toggle("ls-pressed", sorted);
    for (const list of kids) {
      list.sort(sorted ? (a, b) => (rows[b][value] ?? -1) - (rows[a][value] ?? -1) || a - b : (a, b) => a - b);
    }
    order = [];
    const stack = rows.map((r, i) => i).filter((i) => rows[i][PARENT] < 0).reverse();
    while (stack.length) {
      const i = stack.pop();
      order.push(i);
      for (let k = kids[i].length - 1; k >= 0; k--) stack.push(kids[i][k]);
    }
    elems = new Array(rows.length);
    inPage = [];
  }

  function rowFor(i) {
    if (elems[i]) return elems[i];
    const r = rows[i];
    const row = make("div", "ls-row");
    row.dataset.name = r[NAME];
    row.setAttribute("role", "treeitem");
    row.setAttribute("aria-level", String(depth[i] + 1));
    row.style.paddingLeft = `${depth[i] * 14 + 4}px`;
    row.append(make("span", "ls-toggle"), make("span", "ls-label", r[LABEL]), make("span", "ls-type", r[TYPE]));
    if (r[ERRORS]) row.append(badge("error", r[ERRORS]));
    if (r[WARNINGS]) row.append(badge("warning", r[WARNINGS]));
    if (r[INFOS]) row.append(badge("info", r[INFOS]));
    const [text, value, , unit] = shownColumn();
    const number = make("span", "ls-params", r[text] ?? "–");
    const total = rows[0][value];
    const share = total > 0 && r[value] !== null ? Math.min(1, r[value] / total) : 0;
    const bar = make("span", "ls-bar");
    const fill = make("span", "ls-bar-fill");
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    bar.append(fill);
    bar.title = r[value] === null ? NOT_COUNTED : `${(share * 100).toFixed(1)}% ${unit} of the model`;
    row.append(number, bar);
    if (!r[CALLED]) {
      row.classList.add("ls-uncalled");
      row.title = "never called in this pass";
    }
    elems[i] = row;
    return row;
  }

  function badge(kind, n) {
    const b = make("span", `ls-badge ls-badge-${kind}`, String(n));
    b.title = `${n} ${kind}${n > 1 ? "s" : ""} here or below`;
    return b;
  }

  function computeVisible() {
    const q = search.value.trim().toLowerCase();
    const out = [];
    if (!q) {
      matches = null;
      const shown = new Uint8Array(rows.length);
      for (const i of order) { // parents come before their children in the display order too
        const p = rows[i][PARENT];
        if (p < 0 || (shown[p] && open.has(rows[p][NAME]))) {
          shown[i] = 1;
          out.push(i);
        }
      }
      return out;
    }
    matches = new Uint8Array(rows.length);
    const keep = new Uint8Array(rows.length);
    for (let i = rows.length - 1; i >= 0; i--) {
      if (lower[i][0].includes(q) || lower[i][1].includes(q)) matches[i] = keep[i] = 1;
      if (keep[i] && rows[i][PARENT] >= 0) keep[rows[i][PARENT]] = 1;
    }
    for (const i of order) if (keep[i]) out.push(i);
    return out;
  }

  function draw() {
    visible = computeVisible();
    position = new Map(visible.map((i, k) => [i, k]));
    status.textContent = matches === null
      ? `${rows.length} modules`
      : `${matches.reduce((a, b) => a + b, 0)} of ${rows.length} modules match`;
    paint();
  }

  function paint() { // put the rows in view into the page, with their current state
    const top = list.scrollTop, height = list.clientHeight || VIEW;
    const first = Math.max(0, Math.floor(top / ROW) - OVERSCAN);
    const last = Math.min(visible.length, Math.ceil((top + height) / ROW) + OVERSCAN);
    const next = visible.slice(first, last);
    const selected = model.get("selected"), marked = model.get("marked");
    for (const i of next) {
      const row = rowFor(i), name = rows[i][NAME];
      const isOpen = matches !== null || open.has(name);
      if (kids[i].length) {
        row.firstChild.textContent = isOpen ? "▾" : "▸";
        row.setAttribute("aria-expanded", String(isOpen));
      }
      row.classList.toggle("ls-selected", name === selected);
      row.setAttribute("aria-selected", String(name === selected));
      row.classList.toggle("ls-cursor", i === cursor);
      row.classList.toggle("ls-marked", name === marked);
      row.classList.toggle("ls-match", matches !== null && matches[i] === 1);
    }
    above.style.height = `${first * ROW}px`;
    below.style.height = `${(visible.length - last) * ROW}px`;
    if (next.length !== inPage.length || next.some((v, k) => v !== inPage[k])) {
      list.replaceChildren(above, ...next.map(rowFor), below);
      inPage = next;
    }
  }

  function scrollTo(i) { // scroll the list only, never the notebook around it
    const k = position.get(i);
    if (k === undefined) return;
    const height = list.clientHeight || VIEW;
    if (k * ROW < list.scrollTop) list.scrollTop = k * ROW;
    else if ((k + 1) * ROW > list.scrollTop + height) list.scrollTop = (k + 1) * ROW - height;
    paint();
  }

  function reveal(name) {
    const i = index.get(name);
    if (i === undefined) return;
    for (let p = rows[i][PARENT]; p >= 0; p = rows[p][PARENT]) open.add(rows[p][NAME]);
    cursor = i;
    draw();
    scrollTo(i);
  }

  function select(i) {
    cursor = i;
    if (model.get("selected") === rows[i][NAME]) {
      draw();
      return;
    }
    model.set("selected", rows[i][NAME]); // fires change:selected, which redraws
    model.save_changes();
  }

  function toggle(i, state) {
    const name = rows[i][NAME];
    if (!kids[i].length) return;
    if (state ?? !open.has(name)) open.add(name);
    else open.delete(name);
    draw();
  }

  function moveTo(i) {
    cursor = i;
    paint();
    scrollTo(i);
  }

  let scrolling = false;
  list.addEventListener("scroll", () => {
    if (scrolling) return;
    scrolling = true;
    requestAnimationFrame(() => {
      scrolling = false;
      paint();
    });
  });
  list.addEventListener("click", (event) => {
    const row = event.target.closest(".ls-row");
    if (!row) return;
    const i = index.get(row.dataset.name);
    if (event.target.classList.contains("ls-toggle")) toggle(i);
    else {
      if (matches === null && kids[i].length) open.add(rows[i][NAME]); // clicking a block opens it too
      select(i);
    }
    list.focus({ preventScroll: true });
  });
  list.addEventListener("keydown", (event) => {
    if (!visible.length) return;
    const k = position.get(cursor) ?? -1;
    const hasKids = kids[cursor] && kids[cursor].length > 0;
    const isOpen = hasKids && (matches !== null || open.has(rows[cursor][NAME]));
    switch (event.key) {
      case "ArrowDown": moveTo(visible[Math.min(k + 1, visible.length - 1)]); break;
      case "ArrowUp": moveTo(visible[Math.max(k - 1, 0)]); break;
      case "Home": moveTo(visible[0]); break;
      case "End": moveTo(visible[visible.length - 1]); break;
      case "ArrowRight":
        if (hasKids && !isOpen) toggle(cursor, true);
        else if (isOpen) moveTo(kids[cursor][0]);
        break;
      case "ArrowLeft":
        if (isOpen && matches === null) toggle(cursor, false);
        else if (rows[cursor][PARENT] >= 0) moveTo(rows[cursor][PARENT]);
        break;
      case "Enter":
      case " ":
        select(cursor);
        break;
      default:
        return;
    }
    event.preventDefault();
    event.stopPropagation();
  });
  search.addEventListener("input", () => {
    list.scrollTop = 0;
    draw();
  });
  search.addEventListener("keydown", (event) => {
    event.stopPropagation();
    if (event.key === "Escape") {
      search.value = "";
      draw();
      scrollTo(cursor);
    } else if (event.key === "ArrowDown" || event.key === "Enter") {
      event.preventDefault();
      if (visible.length) cursor = (matches && visible.find((i) => matches[i])) ?? visible[0];
      list.focus();
      paint();
    }
  });
  expandAll.addEventListener("click", () => {
    rows.forEach((r, i) => kids[i].length && open.add(r[NAME]));
    draw();
  });
  collapseAll.addEventListener("click", () => {
    open = new Set([""]);
    list.scrollTop = 0;
    draw();
  });
  column.addEventListener("change", () => {
    model.set("column", column.value); // fires change:column, which redraws
    model.save_changes();
  });
  sortButton.addEventListener("click", () => {
    model.set("sorted", !model.get("sorted"));
    model.save_changes();
  });

  const onRows = () => {
    load();
    reveal(model.get("selected"));
    requestAnimationFrame(() => scrollTo(cursor)); // once the list is laid out
  };
  const onSelected = () => reveal(model.get("selected"));
  const onView = () => {
    arrange();
    draw();
    scrollTo(cursor);
  };
  model.on("change:rows", onRows);
  model.on("change:selected", onSelected);
  model.on("change:marked", paint);
  model.on("change:column", onView);
  model.on("change:sorted", onView);
  onRows();
  model.send({ event: "shown" }); // the inspector draws its panels once it is on a page
  return () => {
    model.off("change:rows", onRows);
    model.off("change:selected", onSelected);
    model.off("change:marked", paint);
    model.off("change:column", onView);
    model.off("change:sorted", onView);
  };
}

export default { render };
