"""sclens.htmlkit: the two helpers every report page shares (Markdown summaries to HTML, the offline plotly.js)."""

from __future__ import annotations

import html
from pathlib import Path

from .utils import atomic_write


def ensure_plotly_js(out_dir: Path) -> Path:
    """The one ``plotly.min.js`` that every report page in ``out_dir`` loads (offline, no CDN)."""
    js = out_dir / "plotly.min.js"
    if not js.is_file():
        from plotly.offline import get_plotlyjs

        atomic_write(js, lambda p: Path(p).write_text(get_plotlyjs()))
    return js


def md_to_html(md: str) -> str:
    """Minimal Markdown (headings, bold, pipe tables) to HTML; enough for the generated summary."""
    import re

    out, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[-| ]+\|", r)]
            cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:]) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("### "):
            out.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.strip():
            out.append("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(line)) + "</p>")
    flush()
    return "\n".join(out)
