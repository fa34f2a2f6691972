"""One self-contained HTML page: videos side by side per recipe, the results table, stage figures.

Videos are embedded as GIF data URIs and plotly.js is inlined once, so the page opens offline and
can be mailed or attached to an issue as a single file. `videos_html` is the same video grid as an HTML
fragment, which notebooks show with `IPython.display.HTML`.
"""
from __future__ import annotations

import datetime as _dt
import html
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.io.video import gif_data_uri


@dataclass
class VideoRow:
    """One row of videos: a label (e.g. 'FP' or a recipe name) and its clips in prompt order."""

    label: str
    videos: torch.Tensor  # (N, 3, F, H, W)


@dataclass
class ReportContent:
    title: str
    prompts: list[str]
    rows: list[VideoRow] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)  # one dict per model/recipe
    stage_reports: list = field(default_factory=list)  # objects with .name, .summary and .figures()
    notes: list[str] = field(default_factory=list)
    # stage reports grouped under a heading each (e.g. one section per recipe), after `stage_reports`
    stage_sections: list[tuple[str, list]] = field(default_factory=list)


def _fmt(v) -> str:
    if v is None:
        return "&ndash;"  # not measured / not applicable (e.g. PSNR of FP against itself)
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def table_html(rows: list[dict]) -> str:
    """An HTML table of dict rows (columns: every key, in first-seen order; floats to 4 significant digits)."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# the video grid's own rules (safe inside a notebook) and the page's
GRID_STYLE = ("<style>.vid{display:inline-block;margin:2px;text-align:center;font-size:11px;width:136px;vertical-align:top}"
              ".vid img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #333}"
              ".row{margin:8px 0;white-space:nowrap;overflow-x:auto}.label{font-weight:bold;margin:12px 0 4px}</style>")
STYLE = ("<style>body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa}"
         "table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
         "th{background:#eee}</style>" + GRID_STYLE)


def videos_html(rows: list[VideoRow], prompts: list[str], max_videos: int = 16, style: bool = True) -> str:
    """The video grid as an HTML fragment: one labelled row per model, one column per prompt (same seed)."""
    parts = [GRID_STYLE] if style else []
    for row in rows:
        parts.append(f"<div class='label'>{html.escape(row.label)}</div>"
                     + clips_html(list(zip(prompts, row.videos))[:max_videos], style=False))
    return "\n".join(parts)


def clips_html(clips: list[tuple[str, torch.Tensor]], style: bool = True) -> str:
    """Labelled clips (3, F, H, W) in one row, side by side (an HTML fragment)."""
    cells = "".join(f"<div class='vid'><img src='{gif_data_uri(v)}'><br>{html.escape(label)}</div>" for label, v in clips)
    return (GRID_STYLE if style else "") + f"<div class='row'>{cells}</div>"


def _stage_html(rep, first_fig: bool, level: int = 2) -> tuple[list[str], bool]:
    parts = [f"<h{level}>Stage: {html.escape(rep.name)}</h{level}>"]
    summary = getattr(rep, "summary", None)
    if summary:
        parts.append(table_html([summary]))
    for note in getattr(rep, "notes", None) or []:
        parts.append(f"<p>{html.escape(str(note))}</p>")
    for fig in rep.figures():
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first_fig else False))
        first_fig = False
    return parts, first_fig


def render_html(content: ReportContent, max_videos: int = 16) -> str:
    """The report as an HTML string."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(content.title)}</title>",
        STYLE,
        "</head><body>",
        f"<h1>{html.escape(content.title)}</h1>",
        f"<p>Generated {_dt.datetime.now().isoformat(timespec='seconds')} on {html.escape(platform.node())} "
        f"({html.escape(platform.processor() or platform.machine())}).</p>",
    ]
    for n in content.notes:
        parts.append(f"<p>{html.escape(n)}</p>")
    if content.table:
        parts += ["<h2>Results</h2>", table_html(content.table)]
    if content.rows:
        parts.append("<h2>Videos (same prompt and seed in each column)</h2>")
        parts.append(videos_html(content.rows, content.prompts, max_videos, style=False))
    first_fig = True
    for rep in content.stage_reports:
        more, first_fig = _stage_html(rep, first_fig)
        parts += more
    for heading, reports in content.stage_sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for rep in reports:
            more, first_fig = _stage_html(rep, first_fig, level=3)
            parts += more
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(content: ReportContent, path: str | Path, overwrite: bool = False) -> Path:
    """Write the HTML report; an existing file is kept unless overwrite is set."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; choose another path or pass --force to overwrite it")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_html(content), encoding="utf-8")
    return p
