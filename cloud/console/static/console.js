/* edgefleet console: draws the chart specs embedded in a page with uPlot.
   A spec is {id, title, kind: line|bar|points, x, series: [{label, values}], xlabels,
   xtime, xlabel, ylabel, notes}; window.fleetCharts[id] = {spec, plot} once drawn.
   Category bars are grouped: series k sits at x = i + offset(k). Runs on page load
   and on every htmx swap (the live updates). */
(function () {
  "use strict";
  var PALETTE = ["#2f6fdf", "#e0712c", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                 "#17becf", "#bcbd22", "#1d2330"];  /* red and grey: thresholds */
  window.fleetCharts = window.fleetCharts || {};

  function clock(t) {
    return new Date(t * 1000).toISOString().slice(11, 19);
  }

  function grouped(spec) {
    var n = spec.series.length, w = n > 1 ? 0.8 / n : 0, xs = [], cols = [];
    spec.series.forEach(function () { cols.push([]); });
    spec.x.forEach(function (x, i) {
      spec.series.forEach(function (s, k) {
        xs.push(x + (k - (n - 1) / 2) * w);
        spec.series.forEach(function (_t, j) { cols[j].push(j === k ? s.values[i] : null); });
      });
    });
    return [xs].concat(cols);
  }

  function options(spec, width) {
    var cat = spec.xlabels && spec.xlabels.length > 0;
    var n = spec.series.length;
    var series = [{
      label: spec.xlabel || (spec.xtime ? "time" : "x"),
      value: function (u, v, si, idx) {
        if (v == null) { return "-"; }
        if (cat) { return spec.xlabels[Math.round(v)] || ""; }
        if (spec.xtime) { return clock(v); }
        if (spec.notes && spec.notes.length && idx != null) { return spec.notes[idx]; }
        return String(+v.toFixed(3));
      }
    }];
    spec.series.forEach(function (s, k) {
      var threshold = s.label === "threshold";
      var color = threshold ? (spec.kind === "bar" ? "#98a2b3" : "#d62728")
                            : PALETTE[k % PALETTE.length];
      var o = { label: s.label, stroke: color, width: 2, spanGaps: false };
      if (spec.kind === "bar") {
        o.fill = color + "bb";
        o.paths = uPlot.paths.bars({ size: [n > 1 ? 0.9 : 0.6, 80], align: 0 });
        o.points = { show: false };
      } else if (spec.kind === "points") {
        o.paths = function () { return null; };
        o.points = { show: true, size: 12, fill: color, stroke: color };
      } else if (threshold) {
        o.dash = [6, 4];
      }
      series.push(o);
    });
    var xaxis = { label: spec.xlabel || "" };
    if (cat) {
      xaxis.splits = function () { return spec.x; };
      xaxis.values = function (u, splits) {
        return splits.map(function (v) { return spec.xlabels[Math.round(v)] || ""; });
      };
    }
    var pad = cat ? 0.6 : 0;
    return {
      title: spec.title,
      width: width,
      height: 240,
      series: series,
      scales: {
        x: cat ? { time: false, range: function () { return [spec.x[0] - pad, spec.x[spec.x.length - 1] + pad]; } }
          : spec.kind === "points" ? { time: false, range: function (u, min, max) {
              var span = Math.max(max - min, Math.abs(max) * 0.2, 1);
              return [Math.max(0, min - span * 0.15), max + span * 0.15]; } }
          : { time: !!spec.xtime },
        y: { range: function (u, min, max) { return [Math.min(0, min), max > 0 ? max * 1.1 : 1]; } }
      },
      axes: [xaxis, { label: spec.ylabel || "" }],
      legend: { live: true }
    };
  }

  function draw(el) {
    var spec = JSON.parse(el.textContent);
    var fig = el.closest("figure");
    var holder = fig.querySelector(".plot");
    holder.innerHTML = "";
    var cat = spec.xlabels && spec.xlabels.length > 0;
    var data = spec.kind === "bar" && cat ? grouped(spec)
      : [spec.x].concat(spec.series.map(function (s) { return s.values; }));
    if (spec.x.length === 0) {
      holder.innerHTML = "<p class=\"empty\">no data yet</p>";
      window.fleetCharts[spec.id] = { spec: spec, plot: null };
      return;
    }
    var width = Math.max(280, Math.min(holder.clientWidth || 560, 900));
    var plot = new uPlot(options(spec, width), data, holder);
    window.fleetCharts[spec.id] = { spec: spec, plot: plot };
  }

  function drawAll(root) {
    (root || document).querySelectorAll("script.chart-spec").forEach(draw);
  }

  window.fleetDrawCharts = drawAll;
  if (window.htmx) {
    window.htmx.onLoad(function (el) { drawAll(el); });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { drawAll(document); });
  } else {
    drawAll(document);
  }
})();
