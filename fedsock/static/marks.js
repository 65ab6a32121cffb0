// Marks where a session of a run began (--stay's next session, or a --resume): a dashed vertical line
// before the session's first round, with a short label. From metrics.csv's `session` and `resumed` columns;
// shared by the live page's charts and the runs view's comparison.
"use strict";

// [{round, label}] for rows sorted by round: each round whose session differs from the round before it.
function sessionMarks(rows) {
  const marks = [];
  for (let i = 1; i < rows.length; i++) {
    const before = rows[i - 1].session, row = rows[i];
    if (row.session != null && before != null && row.session !== before) {
      marks.push({ round: row.round, label: row.resumed ? "resumed" : `session ${row.session}` });
    }
  }
  return marks;
}

// A uPlot plugin that draws the marks `getMarks(u)` gives ({round, label, color?}); the marks it drew stay
// on the chart as u.sessionMarks (what a test, or a curious reader, can check).
function marksPlugin(getMarks) {
  return { hooks: { draw: [(u) => {
    const marks = getMarks(u), ctx = u.ctx, ratio = window.devicePixelRatio || 1;
    const { left, top, width, height } = u.bbox;
    u.sessionMarks = marks;
    ctx.save();
    ctx.lineWidth = ratio;
    ctx.setLineDash([4 * ratio, 3 * ratio]);
    ctx.font = `${11 * ratio}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    marks.forEach((m, i) => {
      const x = Math.round(u.valToPos(m.round - 0.5, "x", true));  // between the two sessions' rounds
      if (x < left || x > left + width) return;
      ctx.strokeStyle = ctx.fillStyle = m.color || "#6b7385";
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      ctx.fillText(m.label, x + 3 * ratio, top + (2 + 12 * (i % 3)) * ratio);  // staggered: near marks stay legible
    });
    ctx.restore();
  }] } };
}
