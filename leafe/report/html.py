"""The HTML report: one self-contained file (inline CSS and SVG, no scripts, no external
resources) with every table and plot of the report."""

from __future__ import annotations

import re

import jinja2

import leafe
from leafe.report.data import groups_of
from leafe.report.render import table_html
from leafe.report.tables import TableModel

PAGE = jinja2.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="leafe {{ version }}">
<title>{{ name|e }} — leafe report</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       color: #1a1a1a; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table.leafe { border-collapse: collapse; margin: 0.5rem 0; font-variant-numeric: tabular-nums; }
table.leafe caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
table.leafe th, table.leafe td { padding: 0.25rem 0.6rem; white-space: nowrap; }
table.leafe thead tr:last-child th { border-bottom: 1.5px solid #333; }
table.leafe thead { border-top: 2px solid #333; } table.leafe tbody { border-bottom: 2px solid #333; }
table.leafe th.group { border-bottom: 1px solid #999; text-align: center; }
.l { text-align: left; } .r { text-align: right; }
.ci { color: #666; font-size: 0.8em; }
p.caption, p.note { color: #444; font-size: 0.9rem; max-width: 60rem; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.9rem; }
code { background: #f3f3f3; padding: 0 0.2em; }
.meta { color: #666; font-size: 0.85rem; }
</style></head>
<body>
<h1>{{ name|e }}</h1>
<p class="meta">{{ meta|e }}</p>
{% for t in tables %}<section class="table" style="overflow-x: auto">{{ t }}</section>
{% endfor %}
{% for p in plots %}<figure id="plot-{{ p.name }}">{{ p.svg }}<figcaption>{{ p.caption|e }}</figcaption></figure>
{% endfor %}
</body></html>
""")

CAPTIONS = {
    "passk": "Pass@k against k (log2 axis) for every method; bands: bootstrap interval over test tasks.",
    "stage1": "LEAFE Stage 1 on the train tasks: trajectories and successes per tree depth; the "
              "exploration's success at its first trajectory, within the budget, and by a branch after rollback.",
    "training": "Training curves from the trainers' logs: loss per optimizer step; for GRPO, rollout "
                "success per iteration.",
}


def _inline(svg: str, prefix: str) -> str:
    """An SVG document as an inline element (no XML prolog or doctype), its element ids
    prefixed so that several plots in one page cannot clash."""
    svg = re.sub(r"^.*?(<svg\b)", r"\1", svg, count=1, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    return re.sub(r'(url\(#|href="#)([^)"]+)', rf"\1{prefix}-\2", svg)


def to_html(data: dict, tables: list[TableModel], plots: dict[str, str]) -> str:
    groups = groups_of(data)
    meta = "; ".join(f"{g['name']}: environment {g['env']}, policy {g['model']}, {g['samples']} samples per "
                     f"task, seeds {', '.join(map(str, g.get('seeds') or [0]))}" for g in groups)
    meta += f". Generated {data['generated']} by leafe {leafe.__version__}."
    return PAGE.render(
        version=leafe.__version__, name=data["name"], meta=meta,
        tables=[table_html(t) for t in tables],
        plots=[{"name": k, "svg": _inline(v, k), "caption": CAPTIONS[k]} for k, v in plots.items()],
    )
