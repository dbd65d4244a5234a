"""Report cells: best per column in bold with ties honoured; missing evaluations say so."""

from leafe.report import _cells, to_markdown


def row(name, p1, p2, succ):
    return {"method": name, "pass@k": {"1": p1, "2": p2}, "pass^k": {"2": p1 / 2}, "success_rate": succ,
            "mean_steps": 3.0, "prompt_tokens": 100, "completion_tokens": 20, "train_interactions": 5,
            "tasks": 4}


def test_bold_best_with_ties_and_missing_rows():
    data = {"name": "r", "env": "sokoban", "model": "m", "k": [1, 2], "samples": 2, "generated": "now",
            "rows": [row("a", 0.5, 0.75, 0.5), row("b", 0.5, 0.5, 0.25), row("c", 0.0, 0.0, 0.0),
                     {"method": "d", "status": "todo", "train_interactions": 0}]}
    header, body = _cells(data)
    assert header[:3] == ["method", "pass@1", "pass@2"]
    a, b, c, d = body
    assert a[1] == b[1] == "**50.0**"  # tie: both bold
    assert a[2] == "**75.0**" and b[2] == "50.0"
    assert c[1] == "0.0"
    assert d[1:] == ["(not run)"] * (len(header) - 1)
    md = to_markdown(data)
    assert "| d " in md and "(not run)" in md


def test_all_zero_column_has_no_bold():
    data = {"name": "r", "env": "e", "model": "m", "k": [1], "samples": 1, "generated": "now",
            "rows": [row("a", 0.0, 0.0, 0.0) | {"pass@k": {"1": 0.0}, "pass^k": {"1": 0.0}}]}
    _, body = _cells(data)
    assert "**" not in "".join(body[0])
