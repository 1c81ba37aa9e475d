"""`bench report --format html`: the leaderboard as one self-contained page (no external assets:
it opens from disk, offline), rendered from the same data as `--format json` and the markdown
(`bench.report.report_data`): the same cell texts, ranks, bold values, paired comparisons and
provenance. A click on a column header sorts the table's rows by that column (numbers by their
mean, the reference row `none` staying first); figures written beside the page are shown."""

from __future__ import annotations

import html
import json
from pathlib import Path

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " ▲"; } th[aria-sort="descending"]::after { content: " ▼"; }
td.text, th.text { text-align: left; }
tr.reference td { background: #fafafa; color: #555; }
.note { color: #555; font-size: 0.92em; }
img { max-width: 48em; display: block; margin: 0.5em 0; }
"""

# Sorting, and a self-test (`page.html#selftest`) that the headless-browser test reads back from
# the DOM: it sorts the first table by its second column twice and checks the order.
SCRIPT = """
function sortTable(th) {
  const table = th.closest("table"), body = table.tBodies[0], index = th.cellIndex;
  const descending = th.getAttribute("aria-sort") === "ascending";
  table.querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  const key = row => {
    const cell = row.cells[index], value = cell.dataset.value;
    return value !== undefined && value !== "" ? parseFloat(value) : cell.textContent.trim();
  };
  const rows = Array.from(body.rows), fixed = rows.filter(r => r.classList.contains("reference"));
  const sorted = rows.filter(r => !r.classList.contains("reference")).sort((a, b) => {
    const x = key(a), y = key(b);
    const numbers = typeof x === "number" && typeof y === "number";
    const order = numbers ? x - y : String(x).localeCompare(String(y));
    return descending ? -order : order;
  });
  fixed.concat(sorted).forEach(r => body.appendChild(r));
}
document.querySelectorAll("table.leaderboard th").forEach(th => th.addEventListener("click", () => sortTable(th)));
window.addEventListener("error", e => {
  document.body.dataset.errors = (document.body.dataset.errors || "") + e.message;
});
if (location.hash === "#selftest") {
  let verdict = "passed";
  const table = document.querySelector("table.leaderboard");
  if (table) {
    const header = table.querySelectorAll("th")[table.dataset.sortcheck | 0];
    for (const direction of ["ascending", "descending"]) {
      header.click();
      const values = Array.from(table.tBodies[0].rows).filter(r => !r.classList.contains("reference"))
        .map(r => parseFloat(r.cells[header.cellIndex].dataset.value)).filter(v => !isNaN(v));
      const ok = values.every(
        (v, i) => i === 0 || (direction === "ascending" ? values[i - 1] <= v : values[i - 1] >= v));
      if (!ok || header.getAttribute("aria-sort") !== direction) verdict = "failed: " + direction + " " + values;
    }
  }
  document.body.dataset.selftest = verdict;
}
"""


def e(text) -> str:
    return html.escape(str(text), quote=True)


def render_html(data: dict, figures: dict[str, list[Path]] | None = None, link_base: Path | None = None) -> str:
    """The page for one suite's `report_data`; `figures` maps a table title to PNG files drawn
    for it, linked relative to `link_base`."""
    from bench.report import CELLS_NOTE

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Leaderboard: {e(data['suite'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Leaderboard: {e(data['suite'])}</h1>",
        *_provenance(data),
        f"<p class='note'>Cells: {e(CELLS_NOTE)} Click a column header to sort.</p>",
    ]
    for table in data["tables"]:
        parts += _table_section(table, (figures or {}), link_base)
    for analysis in data["analyses"]:
        parts += _analysis_section(analysis)
    if data["failed"]:
        parts.append("<h2>Failed jobs</h2><ul>")
        for failure in data["failed"]:
            what = json.dumps({k: v for k, v in failure.items() if k != "error"})
            parts.append(f"<li>{e(what)}: {e(failure['error'])}</li>")
        parts.append("</ul>")
    parts += [f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _provenance(data: dict) -> list[str]:
    h = data["header"]
    lines = [
        "<ul class='note'>",
        f"<li>Suite {e(', '.join(h['suites']))}: {h['jobs']} jobs, {h['succeeded']} succeeded, {h['failed']} failed "
        f"(store {e(h['store'])})</li>",
        f"<li>Device: {e('; '.join(h['devices']) or 'n/a')}</li>",
        *([f"<li>Machine: {e('; '.join(h['machines']))}</li>"] if h["machines"] else []),
        f"<li>Versions: {e(', '.join(f'{k} {v}' for k, v in h['versions'].items()))}</li>",
        f"<li>Data: {e('; '.join(h['data']))}</li>",
        f"<li>Run: {e(h['run_from'])} to {e(h['run_to'])} (UTC)</li>",
        *([f"<li>Plugins: {e(', '.join(h['plugins']))}</li>"] if h["plugins"] else []),
        "</ul>",
    ]
    if not data.get("complete", True):
        lines.append(
            f"<p><strong>⚠ Incomplete:</strong> {data['jobs_without_result']} of the {data['jobs_planned']} jobs "
            "of the suite's latest run have no result yet.</p>"
        )
    return lines


def _table_section(table: dict, figures: dict[str, list[Path]], link_base: Path | None) -> list[str]:
    title = f"{table['dataset']} / {table['model']} / {table['attack']}"
    labels = {k: m["label"] for row in table["rows"] for k, m in row["metrics"].items()}
    glossary = "; ".join(f"{e(labels[k])}: {e(doc)}" for k, doc in table["glossary"].items() if k in labels)
    parts = [
        f"<h2>{e(title)}</h2>",
        _table(table),
        f"<p class='note'>Ranked by {e(labels.get(table['ranked_by'], table['ranked_by']))}; rows whose 95% "
        f"intervals overlap share a rank. {glossary}</p>",
    ]
    if table["paired_comparisons"]:
        parts.append(
            "<p class='note'>Paired comparisons (same seed; difference first − second, 95% t-interval, "
            "Holm-adjusted p):</p><ul class='note'>"
        )
        for c in table["paired_comparisons"]:
            interval = "" if c["ci_low"] is None else f" [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            parts.append(
                f"<li>{e(c['first']['defense'])} − {e(c['second']['defense'])} (bonafide "
                f"{c['first']['bonafide_size']}): {c['mean']:+.4f}{interval}, {c['n']} seeds, "
                f"p = {c['p_holm']:.2g}</li>"
            )
        parts.append("</ul>")
    if table["methods"]:
        links = "; ".join(
            f"{e(m['name'])} (" + ", ".join(f"<a href='{e(url)}'>{e(label)}</a>" for label, url in m["links"]) + ")"
            for m in table["methods"]
        )
        parts.append(f"<p class='note'>Methods: {links}.</p>")
    for path in figures.get(title, []):
        source = path.relative_to(link_base).as_posix() if link_base and path.is_relative_to(link_base) else path.name
        parts.append(f"<img src='{e(source)}' alt='{e(path.stem)}'>")
    return parts


def _analysis_section(analysis: dict) -> list[str]:
    parts = [
        f"<h2>Analysis: {e(analysis['analysis'])} on {e(analysis['dataset'])} / {e(analysis['model'])}</h2>",
        "<table class='leaderboard'><thead><tr><th class='text'>Value</th><th>Mean ± 95% CI</th></tr></thead><tbody>",
    ]
    for value in analysis["values"].values():
        parts.append(
            f"<tr><td class='text'>{e(value['label'])}</td><td data-value='{_number(value['mean'])}'>"
            f"{e(value['text'])}</td></tr>"
        )
    parts.append("</tbody></table>")
    for finding in analysis["findings"]:
        parts.append(
            f"<p class='note'>{e(finding['claim'])} This run: shown in {finding['shown_in']}/"
            f"{len(finding['seeds'])} seeds.</p>"
        )
    return parts


def _number(value) -> str:
    return "" if value is None else repr(float(value))


def _table(table: dict) -> str:
    rows = table["rows"]
    if not rows:
        return "<p>No rows.</p>"
    keys = [k for k, m in rows[0]["metrics"].items() if not m.get("diagnostic")]
    for row in rows[1:]:
        keys += [k for k, m in row["metrics"].items() if not m.get("diagnostic") and k not in keys]
    labels = {}
    for row in rows:
        labels.update({k: m["label"] for k, m in row["metrics"].items()})
    headline = next((i for i, k in enumerate(keys) if k == table["ranked_by"]), 0) + 4
    out = [
        f"<table class='leaderboard' data-sortcheck='{headline}'><thead><tr>",
        "<th>Rank</th><th class='text'>Defense</th><th>Bonafide</th><th>Seeds</th>",
        *[f"<th>{e(labels[k])}</th>" for k in keys],
        "</tr></thead><tbody>",
    ]
    for row in rows:
        rank = "ref" if row["rank"] is None else str(row["rank"])
        cls = " class='reference'" if row["rank"] is None else ""
        cells = [
            f"<td data-value='{'' if row['rank'] is None else row['rank']}'>{rank}</td>",
            f"<td class='text'>{e(row['defense'])}</td>",
            f"<td data-value='{row['bonafide_size']}'>{e(row['data_text'])}</td>",
            f"<td data-value='{len(row['seeds'])}'>{len(row['seeds'])}</td>",
        ]
        for k in keys:
            metric = row["metrics"].get(k)
            if metric is None or not metric.get("n"):
                cells.append("<td data-value=''></td>")
                continue
            if metric.get("kind") == "flag":
                flagged = (metric["mean"] or 0) > 0
                cells.append(f"<td data-value='{_number(metric['mean'])}'>{'⚠ flagged' if flagged else ''}</td>")
                continue
            text = e(metric["text"])
            shown = f"<b>{text}</b>" if metric.get("clearly_best") else text
            cells.append(f"<td data-value='{_number(metric['mean'])}'>{shown}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_index(folder: Path) -> str:
    """An index of every leaderboard page in `folder` (its *.html files but itself)."""
    pages = sorted(p for p in folder.glob("*.html") if p.name != "index.html")
    items = "".join(f"<li><a href='{e(p.name)}'>{e(p.stem)}</a></li>" for p in pages)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Leaderboards</title>"
        f"<style>{STYLE}</style></head><body><h1>Leaderboards</h1><ul>{items}</ul></body></html>\n"
    )
