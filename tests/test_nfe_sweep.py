"""The quality-cost sweep: every sampler x steps on one checkpoint, counted network evaluations, the Pareto front."""

from __future__ import annotations

import json

import pytest

from configs import compose_config, make_cfg
from difflab.cli.nfe_sweep import main, sweep, table
from difflab.cli.train import run
from difflab.plots import pareto_front


def test_pareto_front_keeps_the_undominated_points():
    points = [(5, 3.0), (10, 2.0), (10, 2.5), (20, 2.0), (50, 1.0), (5, 4.0)]
    assert pareto_front(points) == [0, 1, 4]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nfe")
    run(make_cfg(tmp, "trainer.max_steps=2", "sampler.num_steps=2"))
    return tmp / "checkpoints" / "last.ckpt"


def test_sweep_counts_evaluations_and_writes_table_json_and_plot(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    overrides = [f"ckpt={checkpoint}", "samplers=[ddim,heun]", "steps=[2,4]", "n=10", "batch_size=4",
                 "progress=false", "bootstrap=50", f"out={tmp_path}"]
    rows, floor = sweep(compose_config("nfe_sweep", *overrides))
    nfe = {(row["sampler"], row["steps"]): row["nfe"] for row in rows}
    assert nfe[("ddim", 2)] == 2 and nfe[("ddim", 4)] == 4  # one guided forward per step, whatever the batching
    assert nfe[("heun", 4)] <= 7 and nfe[("heun", 4)] > 4  # 2N - 1, less where a step falls back to Euler
    assert all(row["fid_interval"][0] <= row["fid"] <= row["fid_interval"][1] for row in rows)
    best = min(rows, key=lambda row: row["fid"])
    assert best["within_noise_of_best"] is True
    front = pareto_front([(row["nfe"], row["fid"]) for row in rows])
    assert [k for k, row in enumerate(rows) if row["pareto"]] == sorted(front)
    assert floor["fid_real_vs_real_n"] == 10 and "| sampler | steps | NFE |" in table(rows, floor)
    main.__wrapped__(compose_config("nfe_sweep", *overrides))
    written = json.loads((tmp_path / "results.json").read_text())
    assert [(row["sampler"], row["steps"]) for row in written["rows"]] == [(r["sampler"], r["steps"]) for r in rows]
    assert (tmp_path / "table.md").read_text().count("\n") == 4 + len(rows)  # the floor, a blank line, the head
    assert written["fid_real_vs_real"] == pytest.approx(floor["fid_real_vs_real"])
    assert (tmp_path / "fid_vs_nfe.png").stat().st_size > 10_000
