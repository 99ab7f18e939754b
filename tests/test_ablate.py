"""ablate.py on a tiny grid: every cell runs train.py with the budget and its settings (a vocab_size cell on
a corpus prepared for it), results.jsonl / results.md / plots are written, a finished cell is never rerun and
an interrupted grid continues with the cells it lacks.

    python -m pytest -q tests/test_ablate.py
"""
import json
import os

import pytest
import torch

from configurator import ConfigError
from test_train import TINY, data_dirs, run  # noqa: F401 (data_dirs: a fixture)
from training import bundled_data_dir


def test_a_tiny_grid_runs_reports_and_resumes(tmp_path):
    grid = tmp_path / "grid.py"
    base = [a for a in TINY if not a.startswith("--n_embd")] + ["--eval_interval=20"]
    grid.write_text(f"name = 'tiny'\nout_dir = {str(tmp_path / 'out')!r}\ndata_root = {str(tmp_path / 'data')!r}\n"
                    f"base = {base!r}\nbudget = 0.05\n"
                    "axes = [('n_embd', [16, 32]), ('vocab_size', [300])]\n")
    proc = run("ablate.py", str(grid))
    grid_dir = tmp_path / "out" / "tiny"
    results = [json.loads(line) for line in open(grid_dir / "results.jsonl")]
    assert [r["cell"] for r in results] == ["n_embd16_vocab_size300", "n_embd32_vocab_size300"]
    small, big = results
    assert small["vocab"] == big["vocab"] == 300 and small["params"] < big["params"]
    assert all(r["iters"] > 0 and 0 < r["val_bpb"] < 10 and f"--max_time=0.05" in r["args"] for r in results)
    assert (tmp_path / "data" / "bundled_bpe300" / "meta.json").is_file()  # prepared once, for the vocab_size
    assert "| n_embd16_vocab_size300 |" in (grid_dir / "results.md").read_text() and "val bpb" in proc.stdout
    assert (grid_dir / "bpb_vs_time.png").is_file() and (grid_dir / "bpb_vs_n_embd.png").is_file()
    # every cell is also scored on the whole val split by its final model, and ranked by that
    from checkpoint import load_run
    from data import TokenDataset
    from training import split_bits_per_byte
    model, _, _ = load_run(str(grid_dir / "n_embd32_vocab_size300"), "last")
    with torch.inference_mode():
        expected = split_bits_per_byte(model, TokenDataset(str(tmp_path / "data" / "bundled_bpe300")))
    assert big["split_bpb"] == pytest.approx(expected, rel=1e-6) and small["split_bpb"] != big["split_bpb"]
    table = (grid_dir / "results.md").read_text()
    assert "val bpb (whole split)" in table and f"{big['split_bpb']:.4f}" in table
    first, second = sorted(results, key=lambda r: r["split_bpb"])
    assert table.index(f"| {first['cell']} |") < table.index(f"| {second['cell']} |")

    outputs = {r["cell"]: (grid_dir / r["cell"] / "train.out").read_text() for r in results}
    lines = open(grid_dir / "results.jsonl").read().splitlines()
    (grid_dir / "results.jsonl").write_text(lines[0] + "\n")  # as if the grid stopped during the second cell
    again = run("ablate.py", str(grid))
    assert (grid_dir / "n_embd16_vocab_size300" / "train.out").read_text() == outputs["n_embd16_vocab_size300"]
    assert (grid_dir / "n_embd32_vocab_size300" / "train.out").read_text() != outputs["n_embd32_vocab_size300"]
    assert len(open(grid_dir / "results.jsonl").read().splitlines()) == 2 and "2 of 2 cells done" in again.stdout

    # a grid recorded before cells carried split_bpb: the report scores them from their runs
    older = [json.loads(line) for line in open(grid_dir / "results.jsonl")]
    scores = {r["cell"]: r.pop("split_bpb") for r in older}
    (grid_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in older))
    run("ablate.py", str(grid), "--report_only")
    rescored = {json.loads(line)["cell"]: json.loads(line) for line in open(grid_dir / "results.jsonl")}
    assert {cell: r["split_bpb"] for cell, r in rescored.items()} == pytest.approx(scores, rel=1e-6)


def test_an_empty_or_unknown_grid_is_a_clear_error(tmp_path):
    proc = run("ablate.py", "--name=x", f"--out_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "the grid is empty" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("ablate.py", "--cels=[]", check=False)
    assert proc.returncode != 0 and "did you mean cells" in proc.stderr


def test_an_iteration_budget_runs_cells_in_parallel_and_only_it_may(data_dirs, tmp_path):
    grid = tmp_path / "grid.py"
    base = TINY + [f"--data_dir={data_dirs[0]}", "--eval_interval=3"]
    grid.write_text(f"name = 'steps'\nout_dir = {str(tmp_path / 'out')!r}\nbase = {base!r}\niters = 6\njobs = 2\n"
                    "cells = [('a', {}), ('b', {'learning_rate': 3e-3}), ('c', {'lr_schedule': 'wsd'})]\n")
    run("ablate.py", str(grid))
    grid_dir = tmp_path / "out" / "steps"
    results = {r["cell"]: r for r in map(json.loads, open(grid_dir / "results.jsonl"))}
    assert sorted(results) == ["a", "b", "c"] and all(r["iters"] == 6 for r in results.values())
    assert all("--max_iters=6" in r["args"] and "--max_time=0" in r["args"] for r in results.values())
    started_b, finished_a = os.path.getmtime(grid_dir / "b" / "cell.json"), os.path.getmtime(grid_dir / "a" / "log.jsonl")
    assert started_b < finished_a  # two at a time: b started while a was still training
    assert "# steps: 6 iterations a cell" in (grid_dir / "results.md").read_text()

    timed = tmp_path / "timed.py"
    timed.write_text(f"name = 'timed'\nout_dir = {str(tmp_path / 'out')!r}\nbase = {base!r}\nbudget = 0.05\n"
                     "jobs = 2\ncells = [('a', {})]\n")
    proc = run("ablate.py", str(timed), check=False)
    assert proc.returncode != 0 and "only with an iteration budget" in proc.stderr and "Traceback" not in proc.stderr


def test_a_cell_whose_corpus_cannot_be_prepared_says_why(tmp_path):
    with pytest.raises(ConfigError, match=r"prepare.py .*--vocab_size=100 failed:\n.*too small"):
        bundled_data_dir(str(tmp_path), 100)
    assert not (tmp_path / "bundled_bpe100" / "meta.json").exists()
