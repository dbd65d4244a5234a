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


def s1_row(name, rates, solved, max_attempts=4):
    return {"method": name, "variant": "rollback", "status": "done", "max_attempts": max_attempts, "tasks": 4,
            "pass@k": rates, "solved": solved, "fixed_by_branch": 0.25, "trajectories": 9, "interactions": 1234,
            "replay_steps": 3, "reflections": 5, "reflection_parse_failures": 1, "branches": 5}


def test_stage1_table_marks_k_beyond_max_attempts_and_the_best_rates():
    from leafe.report import _stage1_cells

    s1 = {"k": [1, 2, 4], "budget": 24, "rows": [
        s1_row("a", {"1": 0.25, "2": 0.5, "4": 0.75}, 0.75),
        s1_row("b", {"1": 0.5, "2": 0.5}, 0.5, max_attempts=2),  # no k = 4 for two attempts
        {"method": "c", "variant": "independent", "status": "partial", "max_attempts": 4}]}
    header, (a, b, c) = _stage1_cells(s1)
    assert header[:7] == ["method", "exploration", "pass@1", "pass@2", "pass@4", "solved", "fixed by branch"]
    assert a[2:7] == ["25.0", "**50.0**", "**75.0**", "**75.0**", "**25.0**"]
    assert b[2:7] == ["**50.0**", "**50.0**", "–", "50.0", "**25.0**"]
    assert a[7:] == ["9", "1,234", "3", "5", "1", "5"]
    assert c[2:] == ["(not run)"] + ["–"] * (len(header) - 3)
    data = {"name": "r", "env": "e", "model": "m", "k": [1], "samples": 1, "generated": "now", "rows": [],
            "stage1": s1}
    assert "## Stage 1 (exploration on the train tasks)" in to_markdown(data)
    assert "Stage 1" not in to_markdown(data | {"stage1": {"k": [], "budget": 24, "rows": []}})
