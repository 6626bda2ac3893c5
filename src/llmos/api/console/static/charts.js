// Line charts drawn as SVG: one or more series of [x, y] points on shared axes, with the
// range of each axis written at its ends. Small on purpose: no third-party chart code.
"use strict";

const LLMOSCharts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"];
  const SPARSE = 24;

  function svg(tag, attrs) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function fmt(v) {
    if (!Number.isFinite(v)) return "-";
    const a = Math.abs(v);
    if (a !== 0 && (a < 0.01 || a >= 100000)) return v.toExponential(1);
    return String(Math.round(v * 1000) / 1000);
  }

  // series: [{name, points: [[x, y], ...]}]; options: {title, xFormat}
  function line(container, series, options) {
    const opts = options || {};
    const width = 480, height = 200, pad = { l: 56, r: 12, t: 24, b: 28 };
    const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart" });
    const title = svg("title");
    title.textContent = opts.title || series.map((s) => s.name).join(", ");
    root.append(title);
    if (!all.length) {
      const t = svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" });
      t.textContent = "no data yet";
      root.append(t);
      container.replaceChildren(root);
      return root;
    }
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
    const Y = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
    root.append(svg("line", { x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b, class: "axis" }));
    root.append(svg("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b, class: "axis" }));
    const label = (x, y, text, anchor) => {
      const t = svg("text", { x, y, "text-anchor": anchor, class: "tick" });
      t.textContent = text;
      root.append(t);
    };
    const xf = opts.xFormat || fmt;
    label(pad.l - 4, pad.t + 4, fmt(y1), "end");
    label(pad.l - 4, height - pad.b, fmt(y0), "end");
    label(pad.l, height - 8, xf(x0), "start");
    label(width - pad.r, height - 8, xf(x1), "end");
    series.forEach((s, i) => {
      const pts = s.points.filter((p) => Number.isFinite(p[1]));
      if (!pts.length) return;
      const colour = COLOURS[i % COLOURS.length];
      root.append(svg("polyline", {
        points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: colour, "stroke-width": 2, "data-series": s.name, "data-points": pts.length,
      }));
      // A sparse series (one validation report an epoch) gets a dot per point: a single point draws no line.
      if (pts.length <= SPARSE) for (const p of pts) root.append(svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3, fill: colour, class: "point" }));
      const key = svg("text", { x: pad.l + 8 + i * 130, y: 14, fill: colour, class: "legend" });
      key.textContent = s.name;
      root.append(key);
    });
    container.replaceChildren(root);
    return root;
  }

  return { line };
})();
