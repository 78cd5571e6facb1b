"""A self-contained HTML report: sections of text, tables and figures (PNGs embedded).

Used by ``misfeat demo``; any stage's results can be collected the same way::

    report = Report("misfeat demo")
    report.section("Organism", text="...", table=rows, figures=["em_curve.png"])
    report.write("out/report.html")
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #c33;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figure img{max-width:520px;
border:1px solid #eee}figcaption{font-size:12px;color:#555;max-width:520px}
.key{display:inline-block;background:#fbeaea;border-radius:4px;padding:.3em .7em;margin:.2em;font-size:14px}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}
"""


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)
    raw_html: str = ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"
    return html.escape("" if value is None else str(value))


def table_html(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>(no rows)</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<div style=\"overflow-x:auto\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


class Report:
    def __init__(self, title: str, intro: str = ""):
        self.title = title
        self.intro = intro
        self.sections: list[Section] = []

    def section(self, title: str, *, text: str = "", keys: dict[str, Any] | None = None,
                tables: list[tuple[str, list[dict[str, Any]]]] | None = None,
                figures: list[tuple[str | Path, str]] | None = None, raw_html: str = "") -> Section:
        sec = Section(title, text, tables or [], [(Path(p), c) for p, c in (figures or [])], keys or {}, raw_html)
        self.sections.append(sec)
        return sec

    def html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                 f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        if self.intro:
            parts.append(f"<p>{self.intro}</p>")
        parts.append("<ol>" + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>"
                                      for i, s in enumerate(self.sections)) + "</ol>")
        for i, sec in enumerate(self.sections):
            parts.append(f"<section id='s{i}'><h2>{html.escape(sec.title)}</h2>")
            if sec.keys:
                parts.append("<div>" + "".join(f"<span class='key'><b>{html.escape(k)}</b>: {_fmt(v)}</span>"
                                               for k, v in sec.keys.items()) + "</div>")
            if sec.text:
                parts.append(f"<p>{sec.text}</p>")
            for path, caption in sec.figures:
                if path.is_file():
                    data = base64.b64encode(path.read_bytes()).decode()
                    parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")
                else:
                    parts.append(f"<p><em>missing figure {html.escape(str(path))}</em></p>")
            for caption, rows in sec.tables:
                if caption:
                    parts.append(f"<h3>{html.escape(caption)}</h3>")
                parts.append(table_html(rows))
            if sec.raw_html:
                parts.append(sec.raw_html)
            parts.append("</section>")
        parts.append("</body></html>")
        return "".join(parts)

    def write(self, path: str | Path) -> Path:
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.html(), encoding="utf-8")
        os.replace(tmp, path)
        return path
