// pieced status page. Plain script, no dependencies: the daemon serves it from its
// package and the Content-Security-Policy allows nothing else.
//
// Data: one EventSource (/page/events) brings a "hello" (the torrent list whole) and
// then a "tick" twice a second: the stats sample for the charts, the rows of the torrent
// list that changed and the torrents that went, and for the torrent shown, the runs of
// its piece map that changed since the last tick. The map itself (one byte per piece)
// is loaded from /page/map/IH once, and again only when a step was missed; a change of
// the list that was missed brings the hello again.
'use strict';

(() => {
  const TOKEN = new URLSearchParams(location.search).get('token');
  const $ = (id) => document.getElementById(id);

  /** A URL of the daemon's, carrying the token when the page was opened with one. */
  function apiUrl(path, params = {}) {
    const q = new URLSearchParams(params);
    if (TOKEN) q.set('token', TOKEN);
    const s = q.toString();
    return s ? `${path}?${s}` : path;
  }

  // -- piece states ------------------------------------------------------------------
  // Map bytes: the engine's state 0..4, 5 for a piece that just failed its hash, and
  // the CACHED bit for a piece in the piece cache.
  const NAMES = ['missing', 'partial', 'hashing', 'committing', 'verified', 'failed'];
  const FAILED = 5;
  const CACHED = 8;
  // A cell holding many pieces shows the least advanced of them: failed, then missing...
  const RANK = new Uint8Array([1, 2, 3, 4, 5, 0, 6, 6]);
  const BY_RANK = [FAILED, 0, 1, 2, 3, 4, 4];
  const LEVELS = 8;
  let COLORS = null;
  function colors() {
    if (!COLORS) {
      const css = getComputedStyle(document.documentElement);
      COLORS = {};
      for (const n of [...NAMES, 'cached', 'accent', 'muted', 'line', 'text']) {
        COLORS[n] = css.getPropertyValue('--' + n).trim();
      }
      COLORS.byState = NAMES.map((n) => COLORS[n]);
      // A cell of missing pieces some others of which are verified: the grey leans
      // toward green with their share (LEVELS steps), the state shown stays "missing".
      const a = rgb(COLORS.missing);
      const b = rgb(COLORS.verified);
      COLORS.missingLevels = [];
      for (let l = 0; l < LEVELS; l++) {
        const f = l ? 0.15 + (0.45 * (l - 1)) / (LEVELS - 2) : 0;
        COLORS.missingLevels.push(`rgb(${a.map((x, i) => Math.round(x + (b[i] - x) * f)).join(',')})`);
      }
    }
    return COLORS;
  }

  function rgb(hex) {
    const h = hex.replace('#', '');
    return [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16));
  }

  // -- formatting --------------------------------------------------------------------
  const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  function fmtBytes(n) {
    if (n === null || n === undefined) return '–';
    let i = 0;
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return `${i === 0 ? Math.round(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)} ${UNITS[i]}`;
  }
  const fmtInt = (n) => (n === null || n === undefined ? '–' : Math.round(n).toLocaleString('en-US'));
  const fmtRate = (n) => `${fmtBytes(n)}/s`;
  const fmtPct = (f) => {
    if (f === null || f === undefined) return '–';
    const p = f * 100;
    return `${p >= 99.95 && f < 1 ? '99.9' : p.toFixed(p === 100 || p === 0 ? 0 : 1)}%`;
  };
  const fmtMs = (n) => {
    if (n === null || n === undefined) return '–';
    if (n < 1) return `${Math.round(n * 1000)} µs`;
    return n < 10 ? `${n.toFixed(2)} ms` : `${n.toFixed(0)} ms`;
  };
  const fmtPerS = (n) => (n === null || n === undefined ? '–' : `${n < 10 ? n.toFixed(1) : Math.round(n).toLocaleString('en-US')}/s`);

  // Bidirectional controls in a name (U+202E RIGHT-TO-LEFT OVERRIDE and its kin) reorder
  // what is drawn: "holiday<U+202E>gpj.exe" shows as "holidayexe.jpg". Names, paths and
  // messages show each such control as what it is, as "[U+202E]".
  const BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
  function escapeControls(text) {
    return String(text).replace(BIDI_CONTROLS,
      (c) => `[U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}]`);
  }

  /** A name, escaped and isolated (<bdi>): right-to-left text in it does not carry the
   *  text around it (a size, an info hash) along. */
  function nameEl(text) {
    return el('bdi', '', escapeControls(text));
  }

  // An info hash in the fragment: a key (40 hex digits) or a whole v2 hash (64).
  const IH_TEXT = /^(?:[0-9a-f]{40}|[0-9a-f]{64})$/;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  /** Writes only what changed: a tick then costs the browser no layout where nothing moved. */
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function bar(fraction) {
    const b = el('span', 'bar');
    const i = el('i');
    i.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
    b.append(i);
    return b;
  }

  // -- state ---------------------------------------------------------------------------
  const HISTORY = 240;
  const S = {
    sort: { key: 'name', dir: 1 },
    filter: '',
    selected: null,
    map: null, // Uint8Array, one byte per piece
    seq: 0,
    loading: false,
    pending: [],
    counts: new Array(6).fill(0),
    cached: 0,
    files: [],
    filesTotal: 0,
    errors: [],
    history: [],
    ticks: 0,
    resyncs: 0,
    es: null,
  };

  // -- the live stream -----------------------------------------------------------------
  function connect() {
    if (S.es) S.es.close();
    S.es = null;
    if (document.hidden) return; // connects when shown
    const es = new EventSource(apiUrl('/page/events', S.selected ? { ih: S.selected } : {}));
    S.es = es;
    es.addEventListener('hello', (e) => onHello(JSON.parse(e.data)));
    es.addEventListener('tick', (e) => onTick(JSON.parse(e.data)));
    es.addEventListener('resync', () => connect());
    es.onopen = () => setLive(true);
    es.onerror = () => setLive(false);
  }

  function setLive(on) {
    const live = $('live');
    live.classList.toggle('off', !on);
    setText(live, on ? 'live' : 'reconnecting');
  }

  function onHello(h) {
    setLive(true);
    S.history = h.history.slice(-HISTORY);
    setTorrents(h.list.rows, h.list.to);
    drawCharts();
    updateFacts();
    if (S.selected && !h.torrent) {
      const asked = S.selected;
      forget(); // unregistered, or never known
      showUnknown(asked);
      return;
    }
    if (h.torrent) {
      // Asked for by a v2 hash or another alias: the torrent goes by its key from here on.
      if (h.torrent.ih !== S.selected) adopt(h.torrent.ih);
      S.files = h.torrent.files;
      S.filesTotal = h.torrent.files_total;
      S.errors = h.torrent.errors;
      renderFiles();
      renderErrors();
      S.map = null;
      S.pending = [];
      loadMap();
    }
  }

  function onTick(m) {
    // A change of a list other than the one this page holds: one was missed (a tick
    // lost on the way); the page connects again, and its hello brings the list whole.
    if (m.list && !applyList(m.list)) {
      S.resyncs++;
      connect();
      return;
    }
    S.ticks++;
    S.history.push(m.stats);
    if (S.history.length > HISTORY) S.history.splice(0, S.history.length - HISTORY);
    const t = m.torrent;
    if (t && t.ih === S.selected) {
      if (t.gone) {
        forget();
      } else {
        if ('files_total' in t) S.filesTotal = t.files_total;
        if (t.files) { S.files = t.files; renderFiles(); }
        if (t.errors) { S.errors = t.errors; renderErrors(); }
        if ('to' in t) onDelta(t);
      }
    }
    drawCharts();
    updateFacts();
  }

  // -- the piece map: load once, then deltas -------------------------------------------------
  async function loadMap() {
    if (S.loading || !S.selected) return;
    S.loading = true;
    const ih = S.selected;
    try {
      const r = await fetch(apiUrl(`/page/map/${ih}`), { cache: 'no-store' });
      if (!r.ok) throw new Error(`piece map: HTTP ${r.status}`);
      const map = new Uint8Array(await r.arrayBuffer());
      if (ih !== S.selected) return;
      S.map = map;
      S.seq = Number(r.headers.get('X-Pieced-Seq'));
      recount();
      layoutMap();
    } catch (err) {
      console.warn('pieced:', err.message);
    } finally {
      S.loading = false;
    }
    if (ih !== S.selected || !S.map) return;
    const pending = S.pending;
    S.pending = [];
    for (const d of pending) onDelta(d, true);
  }

  /** A tick's change to the map. ``queued``: it came while the map was loading, and
   *  the map loaded (numbered S.seq) may hold it already. */
  function onDelta(d, queued = false) {
    if (S.loading || !S.map) { S.pending.push(d); return; }
    // A reset is a new map (the torrent registered anew, or too much changed at once):
    // loaded whatever this page's number, unless it is the map just loaded or older.
    if (d.reset) {
      if (!queued || d.to > S.seq) loadMap();
      return;
    }
    if (d.to <= S.seq) return; // already in the map loaded
    if (d.from !== S.seq) { loadMap(); return; }
    applyRuns(d.runs);
    S.seq = d.to;
    drawDirty();
    updateLegend();
  }

  function applyRuns(b64) {
    const bin = atob(b64);
    const map = S.map;
    const u32 = (i) => (bin.charCodeAt(i) | (bin.charCodeAt(i + 1) << 8) | (bin.charCodeAt(i + 2) << 16)) + bin.charCodeAt(i + 3) * 16777216;
    let i = 0;
    while (i + 8 <= bin.length) {
      const start = u32(i);
      const len = u32(i + 4);
      i += 8;
      for (let k = 0; k < len; k++) {
        const p = start + k;
        const v = bin.charCodeAt(i + k);
        const old = map[p];
        if (old === v) continue;
        S.counts[old & 7]--;
        S.counts[v & 7]++;
        S.cached += ((v & CACHED) ? 1 : 0) - ((old & CACHED) ? 1 : 0);
        map[p] = v;
        M.dirty.add(Math.floor(p / M.ppc));
      }
      i += len;
    }
  }

  function recount() {
    S.counts.fill(0);
    S.cached = 0;
    const map = S.map;
    const counts = new Uint32Array(16);
    for (let p = 0; p < map.length; p++) counts[map[p]]++;
    for (let v = 0; v < 16; v++) {
      S.counts[v & 7] += counts[v];
      if (v & CACHED) S.cached += counts[v];
    }
    updateLegend();
  }

  // Cells: as many pieces per cell as it takes to keep the map under MAX_H pixels tall.
  const MAX_H = 360;
  const M = { cell: 10, gap: 1, cols: 1, rows: 1, ppc: 1, cells: 0, vals: null, dirty: new Set(), width: 0 };

  function layoutMap() {
    const t0 = performance.now();
    const canvas = $('map');
    const n = S.map.length;
    const W = Math.max(200, canvas.clientWidth);
    let cell = Math.floor(Math.sqrt((W * MAX_H) / Math.max(1, n)));
    cell = Math.max(3, Math.min(18, cell));
    const cols = Math.max(1, Math.floor(W / cell));
    const maxRows = Math.max(1, Math.floor(MAX_H / cell));
    const ppc = Math.max(1, Math.ceil(n / (cols * maxRows)));
    const cells = Math.ceil(n / ppc);
    Object.assign(M, { cell, gap: cell >= 6 ? 1 : 0, cols, rows: Math.max(1, Math.ceil(cells / cols)), ppc, cells, width: W });
    const dpr = window.devicePixelRatio || 1;
    canvas.style.height = `${M.rows * cell}px`;
    canvas.width = Math.round(W * dpr);
    canvas.height = Math.round(M.rows * cell * dpr);
    M.vals = new Uint8Array(cells);
    for (let c = 0; c < cells; c++) M.vals[c] = cellValue(c);
    M.dirty.clear();
    drawMap();
    M.layoutMs = performance.now() - t0;
    $('d-scale').textContent = ppc === 1
      ? `One cell per piece · ${fmtInt(n)} pieces`
      : `One cell per ${fmtInt(ppc)} pieces, coloured by the least advanced of them (a missing cell greener as more of its pieces are verified) · ${fmtInt(cells)} cells for ${fmtInt(n)} pieces`;
  }

  function cellValue(c) {
    const map = S.map;
    const a = c * M.ppc;
    const b = Math.min(map.length, a + M.ppc);
    let worst = 6;
    let cached = 0;
    let verified = 0;
    for (let p = a; p < b; p++) {
      const v = map[p];
      const r = RANK[v & 7];
      if (r < worst) worst = r;
      if ((v & 7) === 4) verified++;
      cached |= v & CACHED;
    }
    const state = BY_RANK[worst];
    const level = state === 0 && verified ? Math.max(1, Math.round(((LEVELS - 1) * verified) / (b - a))) : 0;
    return state | cached | (level << 4);
  }

  /** A cell's square and its cache mark, in device pixels (integers: no blurred edges). */
  function cellBox(c, k) {
    const { cell, gap, cols } = M;
    const x = (c % cols) * cell;
    const y = Math.floor(c / cols) * cell;
    const x0 = Math.round(x * k);
    const y0 = Math.round(y * k);
    const w = Math.max(1, Math.round((x + cell - gap) * k) - x0);
    const h = Math.max(1, Math.round((y + cell - gap) * k) - y0);
    const s = Math.max(1, Math.round(w / 3));
    return { x0, y0, w, h, mx: x0 + Math.floor((w - s) / 2), my: y0 + Math.floor((h - s) / 2), s, cw: Math.round((x + cell) * k) - x0, ch: Math.round((y + cell) * k) - y0 };
  }

  function cellColor(v) {
    const col = colors();
    return v >> 4 ? col.missingLevels[v >> 4] : col.byState[v & 7];
  }

  /** The cache mark: the cell's colour most of the way to white. */
  const markColors = new Map();
  function markColor(v) {
    const base = cellColor(v);
    let m = markColors.get(base);
    if (!m) {
      const c = base.startsWith('#') ? rgb(base) : base.match(/\d+/g).map(Number);
      m = `rgb(${c.map((x) => Math.round(x + (255 - x) * 0.8)).join(',')})`;
      markColors.set(base, m);
    }
    return m;
  }

  function drawCell(ctx, c, k) {
    const b = cellBox(c, k);
    const v = M.vals[c];
    ctx.clearRect(b.x0, b.y0, b.cw, b.ch);
    ctx.fillStyle = cellColor(v);
    ctx.fillRect(b.x0, b.y0, b.w, b.h);
    if (v & CACHED) {
      ctx.fillStyle = markColor(v);
      ctx.fillRect(b.mx, b.my, b.s, b.s);
    }
  }

  function mapContext() {
    const ctx = $('map').getContext('2d');
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    return ctx;
  }

  /** The whole map as one image: tens of thousands of cells cost one pass over pixels
   *  rather than as many canvas calls. */
  function drawMap() {
    const canvas = $('map');
    const ctx = mapContext();
    const img = ctx.createImageData(canvas.width, canvas.height);
    const px = new Uint32Array(img.data.buffer);
    const W = canvas.width;
    const packed = new Map();
    const pack = (css) => {
      let p = packed.get(css);
      if (p === undefined) {
        const m = css.startsWith('#') ? rgb(css) : css.match(/\d+/g).map(Number);
        p = (0xff000000 | (m[2] << 16) | (m[1] << 8) | m[0]) >>> 0;
        packed.set(css, p);
      }
      return p;
    };
    const k = W / M.width;
    for (let c = 0; c < M.cells; c++) {
      const v = M.vals[c];
      const b = cellBox(c, k);
      const color = pack(cellColor(v));
      for (let y = b.y0; y < b.y0 + b.h; y++) px.fill(color, y * W + b.x0, y * W + b.x0 + b.w);
      if (v & CACHED) {
        const mark = pack(markColor(v));
        for (let y = b.my; y < b.my + b.s; y++) px.fill(mark, y * W + b.mx, y * W + b.mx + b.s);
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawDirty() {
    if (!M.dirty.size) return;
    const ctx = mapContext();
    const k = $('map').width / M.width;
    for (const c of M.dirty) {
      const v = cellValue(c);
      if (v !== M.vals[c]) {
        M.vals[c] = v;
        drawCell(ctx, c, k);
      }
    }
    M.dirty.clear();
  }

  function updateLegend() {
    const ul = $('legend');
    const canvas = $('map');
    const items = NAMES.map((n, i) => [n, S.counts[i]]);
    items.push(['cached', S.cached]);
    if (ul.children.length !== items.length) {
      ul.replaceChildren(...items.map(([name]) => {
        const li = el('li');
        li.append(el('span', `sw ${name}`), el('span', '', name === 'cached' ? 'in cache (SuggestPiece)' : name), el('b'));
        return li;
      }));
    }
    items.forEach(([name, count], i) => {
      setText(ul.children[i].lastChild, fmtInt(count));
      if (canvas.dataset[name] !== String(count)) canvas.dataset[name] = String(count);
    });
    canvas.dataset.pieces = String(S.map ? S.map.length : 0);
  }

  // -- hover -----------------------------------------------------------------------------
  const tipFiles = new Map();
  let tipTimer = 0;
  let tipCell = -1;

  function onMapMove(e) {
    if (!S.map) return;
    const canvas = $('map');
    const rect = canvas.getBoundingClientRect();
    const x = e.clientX - rect.left;
    const y = e.clientY - rect.top;
    const col = Math.floor(x / M.cell);
    const row = Math.floor(y / M.cell);
    const c = row * M.cols + col;
    if (x < 0 || y < 0 || col >= M.cols || c >= M.cells) { hideTip(); return; }
    showTip(c, x, y);
  }

  function hideTip() {
    $('tip').hidden = true;
    tipCell = -1;
  }

  function showTip(c, x, y) {
    const tip = $('tip');
    const first = c * M.ppc;
    const last = Math.min(S.map.length, first + M.ppc) - 1;
    tipCell = c;
    tip.replaceChildren();
    tip.append(el('div', 't-head', first === last ? `Piece ${fmtInt(first)}` : `Pieces ${fmtInt(first)}–${fmtInt(last)} (${fmtInt(last - first + 1)})`));
    const counts = new Array(6).fill(0);
    let cached = 0;
    for (let p = first; p <= last; p++) {
      counts[S.map[p] & 7]++;
      if (S.map[p] & CACHED) cached++;
    }
    const states = el('div', 't-states');
    NAMES.forEach((n, i) => {
      if (!counts[i]) return;
      const s = el('span');
      s.append(el('span', `sw ${n}`), document.createTextNode(first === last ? ` ${n}` : ` ${n} ${fmtInt(counts[i])}`));
      states.append(s);
    });
    if (cached) {
      const s = el('span');
      s.append(el('span', 'sw cached'), document.createTextNode(first === last ? ' in cache' : ` in cache ${fmtInt(cached)}`));
      states.append(s);
    }
    tip.append(states);
    const files = el('div', 't-files');
    tip.append(files);
    const key = `${S.selected}:${first}:${last}`;
    if (tipFiles.has(key)) {
      fillTipFiles(files, tipFiles.get(key));
    } else {
      files.textContent = 'files…';
      clearTimeout(tipTimer);
      tipTimer = setTimeout(() => fetchTipFiles(key, first, last, c), 60);
    }
    tip.hidden = false;
    const wrap = tip.parentElement.clientWidth;
    const left = Math.min(x + 16, Math.max(0, wrap - tip.offsetWidth - 4));
    tip.style.left = `${left}px`;
    tip.style.top = `${y + 16}px`;
  }

  async function fetchTipFiles(key, first, last, c) {
    try {
      const r = await fetch(apiUrl(`/page/files/${S.selected}`, { first, last }), { cache: 'no-store' });
      if (!r.ok) throw new Error(`files: HTTP ${r.status}`);
      const data = await r.json();
      tipFiles.set(key, data);
      if (tipFiles.size > 500) tipFiles.delete(tipFiles.keys().next().value);
      if (tipCell === c && !$('tip').hidden) {
        fillTipFiles($('tip').querySelector('.t-files'), data);
      }
    } catch (err) {
      console.warn('pieced:', err.message);
    }
  }

  function fillTipFiles(box, data) {
    box.replaceChildren();
    for (const f of data.files) {
      const line = el('div');
      line.append(nameEl(f.path), document.createTextNode(`  (${fmtBytes(f.length)})`));
      box.append(line);
    }
    if (data.more) box.append(document.createTextNode(`and ${fmtInt(data.more)} more file${data.more === 1 ? '' : 's'}`));
    if (!data.files.length && !data.more) box.textContent = 'no stored file (padding)';
  }

  // -- torrents ----------------------------------------------------------------------------
  // The list as the daemon sent it: a record per torrent (its row's data and, once it
  // was in the table, its row), ``order`` all of them as the table sorts them, ``shown``
  // those the search matches. The table holds only the rows in and near the window, a
  // spacer row above and below standing for the others: with thousands of torrents the
  // browser lays out and paints a screenful of rows, not thousands, whatever changes
  // elsewhere on the page. The hello brings the list whole; a tick, the rows that
  // changed and the torrents that went: each record is written (its row, if it is in
  // the table) and moved in the order if its place changed; the table is made again
  // (a screenful) only if the order changed.
  const L = {
    recs: new Map(), order: [], shown: [], seq: 0,
    rowH: 32, // a row's height, as drawn (measured)
    gaps: null, // the two spacer rows
    frame: 0,
  };
  const collator = new Intl.Collator(); // (the order of localeCompare, without its cost per call)
  // Past this many changes in one tick the records are written, then sorted in one pass
  // (a few thousand compares), rather than moved one by one.
  const MANY = 64;
  const AROUND = 20; // rows in the table past the window's edges (for scrolling)

  /** The table's order: the column sorted on, then the name, then (whatever the
   *  direction) the info hash, as the daemon lists them. */
  function compareRecs(a, b) {
    const { key, dir } = S.sort;
    const x = a.t[key];
    const y = b.t[key];
    const c = typeof x === 'string' ? collator.compare(x, y) : x - y;
    return (c || collator.compare(a.t.name, b.t.name)) * dir || (a.t.ih < b.t.ih ? -1 : a.t.ih > b.t.ih ? 1 : 0);
  }

  const query = () => S.filter.trim().toLowerCase();
  const matches = (r, q) => !q || r.hay.some((s) => s.includes(q));

  function makeRec(t) {
    return { t, row: null, hay: [t.name.toLowerCase(), escapeControls(t.name).toLowerCase(), t.ih] };
  }

  /** A record's row, made when it first goes into the table: a list of thousands
   *  costs the rows that were ever on screen. */
  function rowOf(r) {
    if (r.row) return r.row.tr;
    const t = r.t;
    const tr = el('tr');
    tr.dataset.ih = t.ih;
    const name = el('td', 'name');
    name.append(nameEl(t.name), el('span', 'ih-short', t.ih.slice(0, 8)));
    name.title = `${escapeControls(t.name)}\n${t.ih}`;
    const pct = el('td', 'num');
    const wrap = el('span', 'pct');
    const b = bar(0);
    r.row = {
      tr, fill: b.firstChild, width: '', pct: el('span'), size: el('td', 'num'), plen: el('td', 'num'),
      backend: el('td'), errors: el('td', 'num'), clients: el('td', 'num'),
    };
    wrap.append(b, r.row.pct);
    pct.append(wrap);
    tr.append(name, r.row.size, pct, r.row.plen, r.row.backend, r.row.errors, r.row.clients);
    writeRec(r);
    return tr;
  }

  /** A record's row from its data (if it has one), writing only the cells whose text
   *  changed: a cell left alone costs the browser nothing at its next frame. */
  function writeRec(r) {
    const row = r.row;
    if (!row) return;
    const t = r.t;
    setText(row.size, fmtBytes(t.size));
    const width = `${Math.max(0, Math.min(1, t.pct)) * 100}%`;
    if (row.width !== width) {
      row.width = width;
      row.fill.style.width = width;
    }
    setText(row.pct, fmtPct(t.pct));
    setText(row.plen, fmtBytes(t.piece_length));
    setText(row.backend, t.backend);
    setText(row.errors, fmtInt(t.errors));
    if (row.errors.classList.contains('bad') !== t.errors > 0) row.errors.classList.toggle('bad');
    setText(row.clients, fmtInt(t.clients));
  }

  function prepare(t) {
    t.pct = t.pieces ? t.verified / t.pieces : 0;
    return t;
  }

  /** The whole list (a hello's). The records of torrents still listed are kept, rows
   *  and all: a page that connects again does not make its table anew. */
  function setTorrents(list, seq) {
    const old = L.recs;
    L.recs = new Map();
    for (const t of list) {
      prepare(t);
      let r = old.get(t.ih);
      if (r && r.t.name === t.name) {
        r.t = t;
        writeRec(r);
      } else {
        r = makeRec(t);
      }
      L.recs.set(t.ih, r);
    }
    L.order = [...L.recs.values()];
    L.seq = seq;
    renderTorrents();
    renderDetailHead();
  }

  /** A tick's change to the list; false if it follows a version of the list this page
   *  does not hold: a change was missed, and applying this one would leave the page
   *  showing torrents gone or rows out of date until they changed again. */
  function applyList(l) {
    if (l.rows) {
      setTorrents(l.rows, l.to);
      return true;
    }
    if (l.from !== L.seq) return false;
    const whole = l.set.length + l.gone.length > MANY;
    let moved = false;
    for (const ih of l.gone) {
      const r = L.recs.get(ih);
      if (!r) continue;
      L.recs.delete(ih);
      if (!whole) L.order.splice(L.order.indexOf(r), 1);
      moved = true;
    }
    for (const t of l.set) {
      prepare(t);
      let r = L.recs.get(t.ih);
      if (r && r.t.name !== t.name) { // (one info hash, one name: never, but then anew)
        if (!whole) L.order.splice(L.order.indexOf(r), 1);
        r = null;
      }
      if (r) {
        r.t = t;
        writeRec(r);
        if (!whole) {
          const i = L.order.indexOf(r);
          if (!inPlace(i)) {
            L.order.splice(i, 1);
            insert(r);
            moved = true;
          }
        }
      } else {
        r = makeRec(t);
        L.recs.set(t.ih, r);
        if (!whole) insert(r);
        moved = true;
      }
    }
    L.seq = l.to;
    if (whole) {
      L.order = [...L.recs.values()];
      renderTorrents();
    } else if (moved) {
      renderTorrents(false);
    }
    renderDetailHead();
    return true;
  }

  /** Whether the record at ``i`` in the order, which changed, is still in its place:
   *  most changes (a share going up while the list is sorted by name) leave it there,
   *  and the order and the table untouched. */
  function inPlace(i) {
    const o = L.order;
    return (i === 0 || compareRecs(o[i - 1], o[i]) <= 0) && (i === o.length - 1 || compareRecs(o[i], o[i + 1]) <= 0);
  }

  /** Puts a record where the order wants it: a bisection, not a sort of the list. */
  function insert(r) {
    const o = L.order;
    let lo = 0;
    let hi = o.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (compareRecs(o[mid], r) <= 0) lo = mid + 1;
      else hi = mid;
    }
    o.splice(lo, 0, r);
  }

  /** The torrents the search shows, in order (``sort``: the order made anew, for a new
   *  sort or a whole list), and the table. */
  function renderTorrents(sort = true) {
    if (sort) L.order.sort(compareRecs);
    const q = query();
    L.shown = q ? L.order.filter((r) => matches(r, q)) : L.order;
    renderWindow();
    $('no-torrents').hidden = L.recs.size > 0;
    $('no-match').hidden = !(L.recs.size > 0 && L.shown.length === 0);
    const { key, dir } = S.sort;
    for (const th of $('torrents').tHead.rows[0].cells) {
      th.classList.toggle('sorted', th.dataset.key === key);
      th.classList.toggle('desc', th.dataset.key === key && dir < 0);
    }
  }

  /** The table: the rows shown that are in or near the window, between two spacers
   *  as tall as the rows they stand for, so that the page scrolls as if they were all
   *  there while the browser lays out and paints a screenful. */
  function renderWindow(measured = false) {
    const tbody = $('torrents').tBodies[0];
    const list = L.shown;
    const n = list.length;
    const H = L.rowH;
    const top = tbody.getBoundingClientRect().top;
    const last = Math.max(0, Math.min(n, Math.ceil((window.innerHeight - top) / H) + AROUND));
    const first = Math.max(0, Math.min(last, Math.floor(-top / H) - AROUND));
    if (!L.gaps) {
      L.gaps = [0, 1].map(() => {
        const tr = el('tr', 'gap');
        tr.setAttribute('aria-hidden', 'true');
        const td = el('td');
        td.colSpan = 7;
        tr.append(td);
        return tr;
      });
    }
    const [above, below] = L.gaps;
    const want = [];
    if (first > 0) {
      setHeight(above, first * H);
      want.push(above);
    }
    for (let i = first; i < last; i++) {
      const tr = rowOf(list[i]);
      if (tr.classList.contains('selected') !== (list[i].t.ih === S.selected)) tr.classList.toggle('selected');
      want.push(tr);
    }
    if (last < n) {
      setHeight(below, (n - last) * H);
      want.push(below);
    }
    const rows = tbody.rows;
    if (rows.length !== want.length || want.some((tr, i) => rows[i] !== tr)) tbody.replaceChildren(...want);
    // A row's height as drawn (its fonts may make it taller than thought; the first
    // after a spacer lacks the border above it): the spacers stand for rows of that
    // height from now on.
    if (!measured && last - first >= 3) {
      const a = rowOf(list[first + 1]).getBoundingClientRect().top;
      const b = rowOf(list[last - 1]).getBoundingClientRect().top;
      const h = (b - a) / (last - first - 2);
      if (h > 0 && Math.abs(h - H) > 0.01) {
        L.rowH = h;
        renderWindow(true);
      }
    }
  }

  function setHeight(gap, px) {
    if (gap.px !== px) {
      gap.px = px;
      gap.firstChild.style.height = `${px}px`;
    }
  }

  /** The table again at the next frame: once a frame, however many scroll events. */
  function scheduleWindow() {
    if (!L.frame) {
      L.frame = requestAnimationFrame(() => {
        L.frame = 0;
        renderWindow();
      });
    }
  }

  /** The selected torrent's row marked, no other. */
  function markSelected() {
    for (const tr of $('torrents').tBodies[0].rows) {
      if (tr.dataset.ih && tr.classList.contains('selected') !== (tr.dataset.ih === S.selected)) tr.classList.toggle('selected');
    }
  }

  function renderDetailHead() {
    const r = S.selected && L.recs.get(S.selected);
    if (!r) return;
    const t = r.t;
    setText($('d-name'), escapeControls(t.name));
    setText($('d-ih'), t.ih);
    setText($('d-facts'), [
      fmtBytes(t.size),
      `${fmtInt(t.pieces)} ${t.pieces === 1 ? 'piece' : 'pieces'} of ${fmtBytes(t.piece_length)}`,
      t.version,
      `backend ${t.backend}`,
      `${fmtPct(t.pct)} verified`,
      `${fmtInt(t.clients)} client${t.clients === 1 ? '' : 's'}`,
    ].join(' · '));
  }

  function renderFiles() {
    const tbody = $('files').tBodies[0];
    tbody.replaceChildren(...S.files.map((f) => {
      const tr = el('tr');
      const path = el('td', 'path');
      path.append(nameEl(f.path));
      path.title = escapeControls(f.path);
      const frac = f.length ? f.done / f.length : 1;
      const prog = el('td');
      const wrap = el('span', 'pct');
      wrap.append(bar(frac), el('span', '', fmtPct(frac)));
      prog.append(wrap);
      tr.append(path, el('td', 'num', fmtBytes(f.length)), prog);
      return tr;
    }));
    $('files-note').textContent = S.filesTotal > S.files.length
      ? `(the first ${fmtInt(S.files.length)} of ${fmtInt(S.filesTotal)})`
      : `(${fmtInt(S.filesTotal)})`;
  }

  function renderErrors() {
    const tbody = $('errors').tBodies[0];
    const rows = S.errors.slice().reverse();
    tbody.replaceChildren(...rows.map((e) => {
      const tr = el('tr');
      const code = e.code || (e.errno !== null && e.errno !== undefined ? String(e.errno) : '–');
      const c = el('td', 'code', e.errno !== null && e.errno !== undefined ? `${code} (${e.errno})` : code);
      // An error met again right after itself is one entry, counted.
      const times = e.count > 1 ? ` (${fmtInt(e.count)} times)` : '';
      const msg = el('td', 'msg', escapeControls(e.message) + times);
      msg.title = escapeControls(e.message) + times;
      tr.append(c, el('td', 'num', e.piece === null || e.piece === undefined ? '–' : fmtInt(e.piece)), msg);
      return tr;
    }));
    $('errors').hidden = rows.length === 0;
    $('no-errors').hidden = rows.length > 0;
  }

  // -- selection -------------------------------------------------------------------------------
  function select(ih) {
    ih = ih && IH_TEXT.test(ih) ? ih : null;
    if (ih === S.selected) return;
    $('unknown').hidden = true;
    S.selected = ih;
    S.map = null;
    S.seq = 0;
    S.pending = [];
    S.files = [];
    S.errors = [];
    hideTip();
    $('detail').hidden = !ih;
    if (ih) {
      $('legend').replaceChildren();
      $('d-scale').textContent = 'loading the piece map…';
      renderDetailHead();
    }
    markSelected();
    connect();
  }

  /** The torrent asked for by another of its hashes, known now by its key. */
  function adopt(key) {
    S.selected = key;
    markSelected();
    renderDetailHead();
  }

  /** A hash asked for that no torrent has: said so above the list (the page shows the
   *  list, as it would with no hash). */
  function showUnknown(ih) {
    const p = $('unknown');
    p.replaceChildren('No torrent is registered under the info hash ', el('code', '', ih), '.');
    p.hidden = false;
  }

  /** The torrent shown is gone (unregistered): back to the list, watching nothing. */
  function forget() {
    history.replaceState(null, '', location.pathname + location.search);
    S.selected = null;
    S.map = null;
    hideTip();
    $('detail').hidden = true;
    markSelected();
    connect();
  }

  // -- charts ------------------------------------------------------------------------------------
  // Each chart: its series (sample key, colour), the floor of its scale (a quiet
  // daemon draws flat lines low, not noise blown up to full height), its caption.
  const CHARTS = {
    throughput: { series: [['write', 'verified'], ['read', 'accent']], floor: 1024 * 1024, axis: fmtRate, text: (s) => `${fmtRate(s.write)} / ${fmtRate(s.read)}` },
    hash_queue: { series: [['hash_queue', 'hashing']], floor: 4, axis: fmtInt, text: (s) => fmtInt(s.hash_queue) },
    hash_ms: { series: [['hash_ms', 'committing']], floor: 0.01, axis: fmtMs, text: (s) => fmtMs(s.hash_ms) },
    hit_ratio: { series: [['hit_ratio', 'verified']], max: 1, axis: fmtPct, text: (s) => fmtPct(s.hit_ratio) },
    cache_bytes: { series: [['cache_bytes', 'accent'], ['buffer_bytes', 'partial']], maxKey: 'budget', axis: fmtBytes, text: (s) => `${fmtBytes(s.cache_bytes)} of ${fmtBytes(s.budget)}` },
    syncs: { series: [['syncs', 'committing']], floor: 10, axis: fmtPerS, text: (s) => fmtPerS(s.syncs) },
    verified: { series: [['verified', 'verified'], ['failed', 'failed']], floor: 10, axis: fmtPerS, text: (s) => fmtPerS(s.verified) },
    clients: { series: [['clients', 'accent']], floor: 4, axis: fmtInt, text: (s) => fmtInt(s.clients) },
  };

  function niceCeil(v) {
    if (v <= 0) return 1;
    const e = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * e >= v) return m * e;
    return 10 * e;
  }

  let chartBoxes = null;

  function drawCharts() {
    const last = S.history[S.history.length - 1];
    if (!chartBoxes) { // read every size first, then write: one layout, not one per chart
      chartBoxes = [...document.querySelectorAll('.chart')].map((fig) => {
        const canvas = fig.querySelector('canvas');
        return { fig, canvas, value: fig.querySelector('.v'), spec: CHARTS[fig.dataset.chart], W: canvas.clientWidth, H: canvas.clientHeight };
      });
    }
    for (const box of chartBoxes) drawChart(box);
    for (const box of chartBoxes) setText(box.value, last ? box.spec.text(last) : '–');
  }

  function drawChart({ canvas, spec, W, H }) {
    const col = colors();
    const dpr = window.devicePixelRatio || 1;
    if (!W || !H) return;
    if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
      canvas.width = Math.round(W * dpr);
      canvas.height = Math.round(H * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const data = S.history;
    let max = spec.max || 0;
    if (!spec.max) {
      for (const s of data) {
        for (const [k] of spec.series) if (s[k] > max) max = s[k];
        if (spec.maxKey && s[spec.maxKey] > max) max = s[spec.maxKey];
      }
      max = spec.maxKey ? max || 1 : niceCeil(Math.max(max, spec.floor || 1));
    }
    const top = 12;
    const plotH = H - top - 1;
    ctx.strokeStyle = col.line;
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (const f of [0, 0.5, 1]) {
      const y = Math.round(top + plotH * (1 - f)) + 0.5;
      ctx.moveTo(0, y);
      ctx.lineTo(W, y);
    }
    ctx.stroke();
    ctx.fillStyle = col.muted;
    ctx.font = '10px system-ui, sans-serif';
    ctx.textBaseline = 'top';
    ctx.fillText(spec.axis(max), 2, 0);
    // The window grows with the history, from 10 s to HISTORY samples.
    const span = Math.min(HISTORY, Math.max(20, data.length));
    const step = W / (span - 1);
    const x0 = W - (data.length - 1) * step;
    spec.series.forEach(([k, colorName], si) => {
      const color = col[colorName];
      const pts = [];
      data.forEach((s, i) => {
        const v = s[k];
        pts.push(v === null || v === undefined ? null : [x0 + i * step, top + plotH * (1 - Math.min(1, v / max))]);
      });
      // fill under the first series, then the line; gaps where there was no value
      const runs = [];
      let cur = [];
      for (const p of pts) {
        if (p) cur.push(p);
        else if (cur.length) { runs.push(cur); cur = []; }
      }
      if (cur.length) runs.push(cur);
      for (const run of runs) {
        if (si === 0 && run.length > 1) {
          ctx.beginPath();
          ctx.moveTo(run[0][0], top + plotH);
          for (const [x, y] of run) ctx.lineTo(x, y);
          ctx.lineTo(run[run.length - 1][0], top + plotH);
          ctx.closePath();
          ctx.globalAlpha = 0.16;
          ctx.fillStyle = color;
          ctx.fill();
          ctx.globalAlpha = 1;
        }
        ctx.beginPath();
        run.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
        if (run.length === 1) ctx.lineTo(run[0][0] + 1, run[0][1]);
        ctx.strokeStyle = color;
        ctx.lineWidth = 1.5;
        ctx.stroke();
      }
    });
  }

  function updateFacts() {
    const s = S.history[S.history.length - 1];
    if (!s) return;
    setText($('f-backend'), s.backend);
    setText($('f-torrents'), fmtInt(s.torrents));
    setText($('f-clients'), fmtInt(s.clients));
    setText($('f-cache'), `${fmtBytes(s.cache_bytes)} / ${fmtBytes(s.budget)}`);
    setText($('f-buffer'), fmtBytes(s.buffer_bytes));
  }

  // -- wiring ------------------------------------------------------------------------------------
  function start() {
    $('search').addEventListener('input', (e) => { S.filter = e.target.value; renderTorrents(false); });
    $('torrents').tHead.addEventListener('click', (e) => {
      const th = e.target.closest('th');
      if (!th) return;
      const key = th.dataset.key;
      S.sort = S.sort.key === key ? { key, dir: -S.sort.dir } : { key, dir: th.dataset.type === 'text' ? 1 : -1 };
      renderTorrents();
    });
    $('torrents').tBodies[0].addEventListener('click', (e) => {
      const tr = e.target.closest('tr');
      if (tr && tr.dataset.ih) location.hash = tr.dataset.ih;
    });
    window.addEventListener('hashchange', () => select(location.hash.slice(1).toLowerCase()));
    window.addEventListener('scroll', scheduleWindow, { passive: true });
    const canvas = $('map');
    canvas.addEventListener('mousemove', onMapMove);
    canvas.addEventListener('mouseleave', hideTip);
    let resizeTimer = 0;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (S.map) layoutMap();
        chartBoxes = null;
        drawCharts();
        renderWindow();
      }, 100);
    });
    renderErrors();
    // A hidden tab lets its stream go: it costs the daemon nothing, and a browser
    // keeps at most six connections to one server, each open stream holding one.
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) {
        connect();
      } else if (S.es) {
        S.es.close();
        S.es = null;
        const live = $('live');
        live.classList.add('off');
        setText(live, 'paused');
      }
    });
    const ih = location.hash.slice(1).toLowerCase();
    if (IH_TEXT.test(ih)) select(ih);
    else connect();
  }

  // What the page shows, for scripts and tests (read-only).
  window.piecedPage = {
    counts() {
      const out = { pieces: S.map ? S.map.length : 0, seq: S.seq, loaded: !!S.map, cached: S.cached, ticks: S.ticks };
      NAMES.forEach((n, i) => { out[n] = S.counts[i]; });
      return out;
    },
    /** A piece as the map holds it: its state's name and whether it is cached. */
    piece(p) {
      if (!S.map || p < 0 || p >= S.map.length) return null;
      return { state: NAMES[S.map[p] & 7], cached: !!(S.map[p] & CACHED) };
    },
    series(name) { return S.history.map((s) => s[name]); },
    selected() { return S.selected; },
    /** The torrents the list shows (those the search matches), in order; the table
     *  holds those of their rows in and near the window. */
    rows() { return L.shown.map((r) => r.t.ih); },
    /** The torrent list as the page holds it: its version, its torrents, how many the
     *  search shows, how many rows the table holds, and how many times a change was
     *  missed (the list loaded anew). */
    list() {
      const inTable = [...$('torrents').tBodies[0].rows].filter((tr) => tr.dataset.ih).length;
      return { seq: L.seq, torrents: L.recs.size, shown: L.shown.length, inTable, resyncs: S.resyncs };
    },
    /** The viewport point at the middle of the cell that shows ``piece``. */
    cellPoint(piece) {
      const c = Math.floor(piece / M.ppc);
      const rect = $('map').getBoundingClientRect();
      return { x: rect.left + (c % M.cols) * M.cell + M.cell / 2, y: rect.top + Math.floor(c / M.cols) * M.cell + M.cell / 2, ppc: M.ppc };
    },
    tip() { return $('tip').hidden ? null : $('tip').textContent; },
    /** Milliseconds the last full layout and drawing of the map took. */
    layoutMs() { return M.layoutMs; },
  };

  start();
})();
