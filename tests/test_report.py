"""Reports: every format shows the numbers a recomputation from the raw records gives; best per
column in bold with ties; missing cells say so; seeds, bootstrap intervals, combined tables;
the HTML renders in headless Chromium; the LaTeX compiles (or is checked structurally)."""

from __future__ import annotations

import io
import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from leafe.cli import app
from leafe.plan import build_plan
from leafe.report import latex_document, main_table, to_markdown, write_reports
from leafe.report.data import bootstrap_ci, curve_ks
from leafe.spec import load_spec
from leafe.store import atomic_write_json

SPEC = """\
leafe: 1
name: {name}
seeds: [0, 1]
env: {{use: sokoban, max_steps: 4, train_tasks: 3, test_tasks: 5}}
models:
  policy: {{name: "{model}", max_tokens: 6}}
budget: {{interactions_per_task: 10}}
methods:
  base: {{}}
  sft: {{}}
{extra}eval: {{samples: 4, k: [1, 2, 4]}}
report: {{formats: [md, json, tex, html]}}
"""


def write_spec(tmp_path: Path, name="rep", model="leafe:tiny-qwen2", extra="  rft: {init: sft}\n") -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(SPEC.format(name=name, model=model, extra=extra))
    return f


def fake_records(loaded, runs: Path, rates: dict[str, float], skip: tuple[str, ...] = (),
                 sft_interactions: dict[int, int] | None = None) -> dict:
    """Finished evaluation (and sft training) stages with random outcomes per seed; returns
    {(method, seed): {task: successes}} as written. sft's training spends 7 interactions per
    seed unless `sft_interactions` says otherwise ({seed: n}, n >= 5)."""
    written = {}
    for one in loaded.per_seed():
        plan = build_plan(one, runs)
        tr = plan.dir(plan.stage("sft.train"))
        tr.mkdir(parents=True, exist_ok=True)
        n = (sft_interactions or {}).get(one.spec.seed, 7)
        atomic_write_json(tr / "metrics.json", {"interactions": n, "budget": {
            "budget_per_task": 10, "interactions": n, "max_per_task": n - 4, "within": True,
            "per_task": {"train-00000": n - 4, "train-00001": 2, "train-00002": 2}}})
        atomic_write_json(tr / "train_log.json", [{"step": i, "loss": 2.0 / i} for i in range(1, 6)])
        (tr / "DONE").write_text("")
        for method, rate in rates.items():
            if method in skip:
                continue
            rng = random.Random(f"{method}-{one.spec.seed}")
            d = plan.dir(plan.stage(f"eval.{method}"))
            d.mkdir(parents=True, exist_ok=True)
            recs, per = [], {}
            for t in range(5):
                task = f"test-{t:05d}"
                for s in range(4):
                    ok = rng.random() < rate
                    per[task] = per.get(task, 0) + ok
                    recs.append({"kind": "episode", "task": task, "sample": s, "success": ok, "steps": 3,
                                 "prompt_tokens": 10, "completion_tokens": 2, "interactions": 3})
            (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            (d / "DONE").write_text("")
            written[(method, one.spec.seed)] = per
    return written


def recompute(written: dict, method: str, k: int, seeds=(0, 1)) -> tuple[float, float | None, list[float]]:
    """pass@k mean and std over seeds, and each task's value averaged over seeds, from the
    successes per task (n = 4), with the textbook estimator."""
    per_seed, per_task = [], []
    tasks = sorted(written[(method, seeds[0])])
    for s in seeds:
        vals = [1 - math.comb(4 - written[(method, s)][t], k) / math.comb(4, k) for t in tasks]
        per_seed.append(sum(vals) / len(vals))
    for t in tasks:
        per_task.append(sum(1 - math.comb(4 - written[(method, s)][t], k) / math.comb(4, k) for s in seeds) / len(seeds))
    mean = sum(per_seed) / len(per_seed)
    std = float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else None
    return mean, std, per_task


def test_bootstrap_interval_and_curve_points():
    v = np.array([0.0, 1.0, 1.0, 0.5])
    lo, hi = bootstrap_ci(v, 0.95, 2000)
    assert 0.0 <= lo < v.mean() < hi <= 1.0
    assert bootstrap_ci(v, 0.95, 2000) == (lo, hi)  # seeded: reproducible
    assert bootstrap_ci(np.array([0.5] * 6), 0.9, 500) == (0.5, 0.5)
    lo90, hi90 = bootstrap_ci(v, 0.5, 2000)
    assert lo <= lo90 and hi90 <= hi  # a lower level gives a narrower interval
    assert curve_ks(8, [1, 3]) == [1, 2, 3, 4, 8] and curve_ks(6, [1, 2]) == [1, 2, 4, 6]


def test_bold_best_with_ties_and_missing_rows():
    def row(name, p1, p2, succ):
        return {"method": name, "pass@k": {"1": p1, "2": p2}, "pass^k": {"2": p1 / 2}, "success_rate": succ,
                "mean_steps": 3.0, "prompt_tokens": 100, "completion_tokens": 20, "train_interactions": 5,
                "tasks": 4}

    group = {"name": "r", "env": "sokoban", "model": "m", "k": [1, 2], "samples": 2, "generated": "now",
             "rows": [row("a", 0.5, 0.75, 0.5), row("b", 0.5, 0.5, 0.25), row("c", 0.0, 0.0, 0.0),
                      {"method": "d", "status": "todo", "train_interactions": 0}]}
    t = main_table(group)
    assert t.header[:3] == ["method", "pass@1", "pass@2"]
    a, b, c, d = t.rows
    assert a[1].bold and b[1].bold and a[1].text == "50.0"  # tie: both bold
    assert a[2].bold and not b[2].bold
    assert not c[1].bold and c[1].text == "0.0"
    assert [x.text for x in d[1:]] == ["(not run)"] * (len(t.header) - 1)
    md = to_markdown(group)
    assert "| d " in md and "(not run)" in md and "**50.0**" in md
    zero = main_table(group | {"rows": [row("a", 0.0, 0.0, 0.0)]})
    assert not any(cell.bold for cell in zero.rows[0])  # an all-zero column has no bold


def _cells_of_md(md: str, method: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {method} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_every_format_agrees_with_a_recomputation_from_the_records(tmp_path):
    f = write_spec(tmp_path)
    loaded = load_spec(f)
    written = fake_records(loaded, tmp_path / "runs", {"base": 0.2, "sft": 0.6}, skip=())
    out = io.StringIO()
    data = write_reports(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=out, width=250))
    rep = tmp_path / "reports"
    assert sorted(p.name for p in rep.iterdir()) == sorted(
        ["rep.md", "rep.json", "rep.tex", "rep.html", "rep.passk.svg", "rep.training.svg"])
    js = json.loads((rep / "rep.json").read_text())
    md = (rep / "rep.md").read_text()
    tex = (rep / "rep.tex").read_text()
    html = (rep / "rep.html").read_text()
    term = out.getvalue()
    assert js["report_version"] == 7 and js["seeds"] == [0, 1]
    rows = {r["method"]: r for r in js["rows"]}
    best = {k: max(recompute(written, m, k)[0] for m in ("base", "sft")) for k in (1, 2, 4)}
    for method in ("base", "sft"):
        r = rows[method]
        assert r["status"] == "done" and r["seeds_done"] == [0, 1] and r["tasks"] == 5
        md_cells = _cells_of_md(md, method)
        tex_line = next(x for x in tex.splitlines() if x.startswith(f"{method} &"))
        term_line = next(x for x in term.splitlines() if x.strip().startswith(method))
        for i, k in enumerate((1, 2, 4)):
            mean, std, per_task = recompute(written, method, k)
            lo, hi = np.quantile(np.array(per_task)[np.random.default_rng(0).integers(0, 5, (1000, 5))].mean(1),
                                 [0.025, 0.975])
            st = r["pass@k_stats"][str(k)]
            assert r["pass@k"][str(k)] == pytest.approx(mean) and st["std"] == pytest.approx(std)
            assert st["ci"] == pytest.approx([lo, hi])
            shown = f"{100 * mean:.1f}"
            extra = f"± {100 * std:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
            bold = abs(mean - best[k]) < 1e-12 and mean > 0
            assert md_cells[1 + i] == (f"**{shown}**" if bold else shown) + " " + extra
            tex_cell = tex_line.split(" & ")[1 + i]
            assert tex_cell.startswith(rf"\textbf{{{shown}}}" if bold else shown)
            assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in tex_cell
            num = f"<b>{shown}</b>" if bold else shown
            assert f'<td class="r">{num} <span class="ci">{extra}</span></td>' in html
            assert shown in term_line
        # the curve's points at the spec's k are the table's numbers
        assert r["curve"]["4"]["mean"] == pytest.approx(r["pass@k"]["4"])
    # rft never ran: every format says so; sft's budget is 7 own interactions, rft inherits them
    assert rows["rft"]["status"] == "todo" and "pass@k" not in rows["rft"]
    assert "(not run)" in _cells_of_md(md, "rft ← sft") and "(not run)" in tex and "(not run)" in html
    assert rows["sft"]["budget"]["own"] == 7 and rows["rft"]["budget"]["inherited"] == 7
    assert _cells_of_md(md, "sft")[-3:] == ["7", "7", "3/10"]
    assert data["name"] == "rep" and "report written" in term


def test_train_interactions_of_several_seeds_are_their_mean_with_their_range(tmp_path):
    """Seeds whose training spent different amounts show the mean and the range, not seed 0's."""
    loaded = load_spec(write_spec(tmp_path, extra=""))
    fake_records(loaded, tmp_path / "runs", {"base": 0.2, "sft": 0.6}, sft_interactions={0: 7, 1: 9})
    data = write_reports(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO()))
    sft = next(r for r in data["rows"] if r["method"] == "sft")
    assert sft["train_interactions"] == 8 and sft["train_interactions_by_seed"] == [7, 9]
    md = (tmp_path / "reports" / "rep.md").read_text()
    assert "8 (7–9)" in _cells_of_md(md, "sft") and "their range when they differ" in md
    base = next(r for r in data["rows"] if r["method"] == "base")
    assert base["train_interactions"] == 0 and "train_interactions_by_seed" not in base


def test_latex_compiles_or_is_structurally_sound(tmp_path):
    f = write_spec(tmp_path, extra="  leafe: {use: leafe, init: sft}\n")
    loaded = load_spec(f)
    fake_records(loaded, tmp_path / "runs", {"base": 0.3, "sft": 0.5, "leafe": 0.5})
    write_reports(loaded, tmp_path / "runs", tmp_path / "reports", None)
    tex = (tmp_path / "reports" / "rep.tex").read_text()
    # structure: balanced environments, every row has as many cells as the tabular has columns
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 2  # main + Stage 1
    for spec_cols, body in re.findall(r"\\begin\{tabular\}\{([lr]+)\}(.*?)\\end\{tabular\}", tex, re.S):
        lines = [x for x in body.splitlines() if x.endswith(r"\\")]
        assert lines and all(len(x[:-2].split(" & ")) == len(spec_cols) for x in lines), body
        assert r"\toprule" in body and r"\midrule" in body and r"\bottomrule" in body
    assert "leafe $\\leftarrow$ sft" in tex and "pass$^{4}$" in tex and "max\\_attempts" in tex
    if shutil.which("pdflatex") is None:
        return  # no TeX engine here (.ci/run installs one, so CI compiles)
    doc = tmp_path / "doc.tex"
    doc.write_text(latex_document(tex))
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_combined_report_of_two_specs_through_the_cli(tmp_path, monkeypatch):
    a = load_spec(write_spec(tmp_path, name="alpha"))
    b = load_spec(write_spec(tmp_path, name="beta", model="leafe:smollm2-135m-instruct",
                             extra="  grpo: {use: grpo-verl-agent}\n"))
    wa = fake_records(a, tmp_path / "runs", {"base": 0.1, "sft": 0.7, "rft": 0.4})
    fake_records(b, tmp_path / "runs", {"base": 0.2, "sft": 0.3}, skip=("grpo",))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["report", "alpha.yaml", "beta.yaml", "--name", "both", "--runs-dir", "runs",
                                 "--reports-dir", "out"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "out" / "both.json").read_text())
    assert data["combined"] and [g["label"] for g in data["groups"]] == [
        "sokoban / tiny-qwen2", "sokoban / smollm2-135m-instruct"]
    md = (tmp_path / "out" / "both.md").read_text()
    assert "(A) sokoban / tiny-qwen2; (B) sokoban / smollm2-135m-instruct" in md
    rft = _cells_of_md(md, "rft")
    assert rft[1].startswith(f"{100 * recompute(wa, 'rft', 1)[0]:.1f}") and rft[5:] == ["n/a"] * 4  # not in beta
    grpo = _cells_of_md(md, "grpo")
    assert grpo[1:5] == ["n/a"] * 4 and grpo[5] == "(not run)"  # in beta, not evaluated
    tex = (tmp_path / "out" / "both.tex").read_text()
    assert r"\multicolumn{4}{c}{sokoban / tiny-qwen2}" in tex and r"\cmidrule(lr){2-5}" in tex
    # a run directory works as a source (the spec its manifest recorded)
    from leafe.manifest import write_manifest

    for one in a.per_seed():
        write_manifest(one, build_plan(one, tmp_path / "runs"))
    r = CliRunner().invoke(app, ["report", "runs/alpha", "--reports-dir", "out2"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out2" / "alpha.json").read_text())["rows"][1]["pass@k"] == \
        json.loads((tmp_path / "out" / "both.json").read_text())["groups"][0]["rows"][1]["pass@k"]
    r = CliRunner().invoke(app, ["report", "runs"])
    assert r.exit_code == 2 and "not a run directory" in r.output


def test_html_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    f = write_spec(tmp_path, extra="  leafe: {use: leafe, init: sft}\n")
    loaded = load_spec(f)
    fake_records(loaded, tmp_path / "runs", {"base": 0.3, "sft": 0.5, "leafe": 0.6})
    data = write_reports(loaded, tmp_path / "runs", tmp_path / "reports", None)
    page_file = tmp_path / "reports" / "rep.html"
    html = page_file.read_text()
    # self-contained: nothing fetched (namespace URIs in the SVG metadata are names, not fetches)
    assert not re.search(r'(src|href)="(https?:)?//|url\((?!#)|<link|<script|<img', html)
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(page_file.as_uri())
            assert page.title() == "rep — leafe report"
            tables = page.locator("table.leafe")
            assert tables.count() == 2  # main + Stage 1
            main = tables.nth(0)
            assert main.locator("tbody tr").count() == 3
            first = [c.strip() for c in main.locator("tbody tr").nth(1).locator("td").all_inner_texts()]
            sft = next(r for r in data["rows"] if r["method"] == "sft")
            assert first[0] == "sft" and first[1].startswith(f"{100 * sft['pass@k']['1']:.1f}")
            figs = page.locator("figure svg")
            assert figs.count() == 2  # Pass@k curves and training (no Stage 1 trees were written)
            for i in range(figs.count()):
                box = figs.nth(i).bounding_box()
                assert box and box["width"] > 200 and box["height"] > 100  # actually laid out
            assert page.locator("#plot-passk").inner_text().count("sft") >= 1  # legend text is text
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# -- paired comparisons (report.compare) ---------------------------------------------------------
def _write_eval(plan, method: str, successes: dict[str, int], n: int = 4) -> None:
    d = plan.dir(plan.stage(f"eval.{method}"))
    d.mkdir(parents=True, exist_ok=True)
    recs = [{"kind": "episode", "task": t, "sample": s, "success": s < c, "steps": 3, "prompt_tokens": 10,
             "completion_tokens": 2, "interactions": 3} for t, c in successes.items() for s in range(n)]
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "DONE").write_text("")


def _paired_reference(a: list[dict[str, int]], b: list[dict[str, int]], k: int, level=0.95, resamples=1000):
    """The difference and its paired percentile bootstrap interval, computed apart from leafe:
    per task the textbook pass@k (n = 4) averaged over the seeds, then one draw of task indices
    (numpy's default_rng(0)) applied to the per-task differences."""
    tasks = sorted(a[0])

    def per_task(runs):
        return np.array([sum(1 - math.comb(4 - r[t], k) / math.comb(4, k) for r in runs) / len(runs) for t in tasks])

    d = per_task(a) - per_task(b)
    idx = np.random.default_rng(0).integers(0, len(tasks), (resamples, len(tasks)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [(1 - level) / 2, 1 - (1 - level) / 2])
    return d.mean(), lo, hi


def test_paired_comparisons_match_an_independent_computation_in_every_format(tmp_path):
    f = tmp_path / "cmp.yaml"
    f.write_text(SPEC.format(name="cmp", model="leafe:tiny-qwen2", extra="  rft: {init: sft}\n")
                 .replace("report: {formats: [md, json, tex, html]}",
                          "report: {formats: [md, json, tex, html], compare: [[sft, base], [rft, sft], [sft, rft]]}"))
    loaded = load_spec(f)
    tasks = [f"test-{t:05d}" for t in range(6)]
    # tasks differ a lot in difficulty, sft is one success better than base on every task under
    # both seeds: unpaired intervals would overlap, the paired one excludes 0. rft equals sft on
    # most tasks (seed 0 only: seed 1 never ran), so that difference is not significant.
    base = [dict(zip(tasks, [0, 3, 1, 2, 0, 3])), dict(zip(tasks, [1, 2, 0, 3, 0, 2]))]
    sft = [{t: c + 1 for t, c in run.items()} for run in base]
    rft = [dict(zip(tasks, [2, 4, 2, 3, 0, 4]))]
    for i, one in enumerate(loaded.per_seed()):
        plan = build_plan(one, tmp_path / "runs")
        _write_eval(plan, "base", base[i])
        _write_eval(plan, "sft", sft[i])
        if i == 0:
            _write_eval(plan, "rft", rft[0])
    out = io.StringIO()
    data = write_reports(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=out, width=250))
    rep = tmp_path / "reports"
    js = json.loads((rep / "cmp.json").read_text())
    md, tex, html, term = ((rep / "cmp.md").read_text(), (rep / "cmp.tex").read_text(),
                           (rep / "cmp.html").read_text(), out.getvalue())
    pairs = js["compare"]["pairs"]
    assert [(p["a"], p["b"], p["status"]) for p in pairs] == [
        ("sft", "base", "done"), ("rft", "sft", "done"), ("sft", "rft", "done")]
    assert pairs[0]["seeds"] == [0, 1] and pairs[1]["seeds"] == [0] and pairs[0]["tasks"] == 6
    assert js["compare"]["ci"] == 0.95 and js["compare"]["bootstrap"] == 1000

    def pp(v):
        v = round(100 * v, 1)
        return "0.0" if v == 0 else f"{v:+.1f}"

    for p, (a, b) in zip(pairs, [(sft, base), (rft, sft[:1]), (sft[:1], rft)]):
        for k in (1, 2, 4):
            diff, lo, hi = _paired_reference(a, b, k)
            got = p["k"][str(k)]
            assert got["diff"] == pytest.approx(diff) and got["ci"] == pytest.approx([lo, hi])
            assert got["significant"] == (lo > 0 or hi < 0)
            cell = f"{pp(diff)} [{pp(lo)}, {pp(hi)}] {'*' if got['significant'] else 'n.s.'}"
            label = f"{p['a']} − {p['b']}"
            assert cell in _cells_of_md(md, label)
            assert cell in next(x for x in tex.splitlines() if x.startswith(f"{p['a']} $-$ {p['b']} &"))
            assert f'<td class="r">{cell}</td>' in html
            assert cell in next(x for x in term.splitlines() if x.strip().startswith(label))
    # sft beats base by one success per task: significant at every k; rft vs sft is not at k = 1
    assert all(pairs[0]["k"][k]["significant"] and pairs[0]["k"][k]["diff"] > 0 for k in ("1", "2", "4"))
    assert not pairs[1]["k"]["1"]["significant"] and pairs[1]["k"]["1"]["ci"][0] < 0 < pairs[1]["k"]["1"]["ci"][1]
    assert pairs[2]["k"]["1"]["diff"] == pytest.approx(-pairs[1]["k"]["1"]["diff"])
    assert "paired bootstrap interval (1000 resamples" in md and "n.s.: it contains 0" in md
    assert "sft − base: 6 test tasks, seeds 0, 1; rft − sft: 6 test tasks, seed 0" in md
    assert max(map(ord, tex)) < 256  # pdflatex's default input encoding: Δ and − are written as math
    assert data["compare"] == js["compare"]


def _write_trees(plan, method: str, outcomes: dict[str, list[str]]) -> None:
    """A finished explore stage whose task trees ran the given trajectory outcomes in order."""
    d = plan.dir(plan.stage(f"{method}.explore"))
    d.mkdir(parents=True, exist_ok=True)
    trees = [{"task": t, "interactions": len(o), "replay_steps": 0, "reflections": 0, "reflection_parse_failures": 0,
              "nodes": [{"id": i, "parent": None if i == 0 else 0, "depth": min(i, 1), "outcome": x}
                        for i, x in enumerate(o)]} for t, o in outcomes.items()]
    (d / "trees.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trees))
    (d / "DONE").write_text("")


def test_stage1_paired_differences_match_an_independent_computation(tmp_path):
    """Table 3's claims: exploration pass@k and solved of two explorations, paired over the train
    tasks (seeds averaged per task), in every format."""
    f = tmp_path / "s1.yaml"
    f.write_text(SPEC.format(name="s1", model="leafe:tiny-qwen2",
                             extra="  roll: {use: leafe, max_attempts: 2}\n"
                                   "  ind: {use: leafe, explore_mode: independent, max_attempts: 2}\n"
                                   "  same: {use: leafe, max_attempts: 2, rehearsal_fraction: 0, reuse: roll}\n")
                 .replace("report: {formats: [md, json, tex, html]}",
                          "report: {formats: [md, json, tex, html], compare: [[roll, ind], [roll, base], [roll, same]]}"))
    loaded = load_spec(f)
    tasks = [f"train-{t:05d}" for t in range(3)]
    S, F = "success", "failure"
    roll = [dict(zip(tasks, [[F, S], [S], [F, F]])), dict(zip(tasks, [[S], [F, S], [F, S]]))]
    ind = [dict(zip(tasks, [[F, F], [S], [F, F]])), dict(zip(tasks, [[F, S], [F, F], [F, F]]))]
    for i, one in enumerate(loaded.per_seed()):
        plan = build_plan(one, tmp_path / "runs")
        _write_trees(plan, "roll", roll[i])
        _write_trees(plan, "ind", ind[i])
    out = io.StringIO()
    write_reports(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=out, width=250))
    js = json.loads((tmp_path / "reports" / "s1.json").read_text())
    pairs = js["stage1"]["compare"]
    # base explores nothing; same shares roll's exploration (reuse:): nothing to compare
    assert [(p["a"], p["b"], p["tasks"], p["seeds"]) for p in pairs] == [("roll", "ind", 3, [0, 1])]

    def reference(k):  # per task: a success among the first k, averaged over the two seeds
        def hit(runs):
            return np.array([np.mean([S in r[t][:k] for r in runs]) for t in tasks])
        d = hit(roll) - hit(ind)
        idx = np.random.default_rng(0).integers(0, len(tasks), (1000, len(tasks)))
        return d.mean(), *np.quantile(d[idx].mean(axis=1), [0.025, 0.975])

    for key, k in (("1", 1), ("2", 2)):
        diff, lo, hi = reference(k)
        got = pairs[0]["k"][key]
        assert got["diff"] == pytest.approx(diff) and got["ci"] == pytest.approx([lo, hi])
    diff, lo, hi = reference(2)  # every tree ran at most max_attempts = 2 trajectories: solved = pass@2
    assert pairs[0]["solved"]["diff"] == pytest.approx(diff) == pytest.approx(0.5)
    assert pairs[0]["solved"]["significant"] and pairs[0]["solved"]["ci"] == pytest.approx([0.5, 0.5])
    md = (tmp_path / "reports" / "s1.md").read_text()
    assert "Stage 1, paired differences" in md and "| roll − ind " in md and "Δsolved" in md
    assert "roll − ind: 3 train tasks, seeds 0, 1" in md
    tex, html = ((tmp_path / "reports" / f"s1.{x}").read_text() for x in ("tex", "html"))
    assert "roll $-$ ind &" in tex and "paired bootstrap interval over the train tasks" in tex
    assert "Stage 1, paired differences" in html and "+50.0 [+50.0, +50.0] *" in html
    assert "Stage 1, paired differences" in out.getvalue()


def test_compare_names_methods_of_the_spec(tmp_path):
    from leafe.errors import SpecError

    f = write_spec(tmp_path)
    with pytest.raises(SpecError, match=r"report.compare\[0\]\[1\]: 'grpo' is not a method of this spec"):
        load_spec(f, ["report.compare=[[sft, grpo]]"])
    with pytest.raises(SpecError, match=r"compares a method with itself"):
        load_spec(f, ["report.compare=[[sft, sft]]"])
    r = CliRunner().invoke(app, ["validate", str(f), "--set", "report.compare=[[sft, nope]]"])
    assert r.exit_code == 2 and "'nope' is not a method of this spec" in r.output


def test_extra_rows_are_marked_from_the_spec(tmp_path):
    """A method with `extra: true` (a row the paper's table does not have) is marked in the
    report data and so in the table."""
    from leafe.report.data import collect

    f = write_spec(tmp_path, extra="  rft: {init: sft, extra: true}\n")
    loaded = load_spec(f)
    fake_records(loaded, tmp_path / "runs", {"base": 0.1, "sft": 0.5, "rft": 0.6})
    data = collect(loaded, tmp_path / "runs")
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["rft"].get("extra") is True and "extra" not in rows["sft"]
    t = main_table(data)
    assert any("(extra)" in c.text for c in next(r for r in t.rows if "rft" in r[0].text))
