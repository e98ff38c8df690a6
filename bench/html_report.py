"""One self-contained HTML page per benchmark run: it opens from disk with no network (charts are embedded PNGs,
the style and the few lines of script are inline). A summary table, the charts, and optionally a selector: one
button per batch size or load level that switches the statistics and charts shown below it to that choice, as
TGI's benchmark does in a terminal."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class View:
    """What the selector shows for one choice."""
    name: str  # the button's label, e.g. "batch 8"
    table: list[dict] = field(default_factory=list)  # rows of statistics
    charts: list[Path] = field(default_factory=list)


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .charts img { max-width: 560px; border: 1px solid #eee; }
#selector button { margin: 0 .3em .3em 0; padding: .35em .8em; border: 1px solid #999; background: #fff;
  border-radius: 4px; cursor: pointer; } #selector button[aria-selected="true"] { background: #3b75af; color: #fff; }
details { margin: .5em 0; } pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
"""

_SCRIPT = """
const buttons = document.querySelectorAll('#selector button');
function show(name) {
  for (const b of buttons) b.setAttribute('aria-selected', String(b.dataset.view === name));
  for (const s of document.querySelectorAll('section.view')) s.hidden = s.dataset.view !== name;
}
for (const b of buttons) b.addEventListener('click', () => show(b.dataset.view));
if (buttons.length) show(buttons[0].dataset.view);
"""


def _cell(value) -> str:
    if isinstance(value, float):
        text, numeric = f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}", True
    else:
        text, numeric = ("" if value is None else str(value)), isinstance(value, int) and not isinstance(value, bool)
    return f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"


def table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(nothing measured)</p>"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _images(paths: list[Path]) -> str:
    tags = []
    for path in paths:
        data = base64.b64encode(Path(path).read_bytes()).decode()
        tags.append(f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">')
    return f'<div class="charts">{"".join(tags)}</div>'


def write_html(path: Path, *, title: str, intro: str, header: dict, summary: list[dict], charts: list[Path],
               views: list[View] = (), views_label: str = "batch size", notes: list[str] = ()) -> Path:
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    parts += ["<h2>Summary</h2>", table(summary), _images(charts)]
    if views:
        buttons = "".join(f'<button type="button" data-view="{i}" aria-selected="false">{html.escape(v.name)}'
                          f"</button>" for i, v in enumerate(views))
        parts += [f"<h2>By {html.escape(views_label)}</h2>", f'<nav id="selector">{buttons}</nav>']
        parts += [f'<section class="view" data-view="{i}" hidden><h3>{html.escape(v.name)}</h3>{table(v.table)}'
                  f"{_images(v.charts)}</section>" for i, v in enumerate(views)]
    setup = html.escape(json.dumps(header, indent=2, default=str))
    parts.append(f"<details><summary>Device, versions and settings</summary><pre>{setup}</pre></details>")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}<script>{_SCRIPT}</script></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
