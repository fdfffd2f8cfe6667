"""Sweeps run, skip finished runs and feed the analysis; the power-law fit recovers known parameters."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from k2jax.cli import main
from k2jax.config import ConfigError
from k2jax.sweep.analysis import PowerLawFit, compute_multiplier, fit_power_law, multiplier_interval
from k2jax.sweep.grid import launch_commands, load_sweep, run_sweep

ROOT = Path(__file__).parents[1]


def _write_sweep(tmp_path, grid, **extra) -> Path:
    spec = {"name": "t", "base": str(ROOT / "experiments" / "tiny.yaml"), "out_dir": str(tmp_path / "sweep"),
            "set": {"train.steps": 4, "train.eval_every": 2, "train.log_every": 1, "checkpoint.every": 4,
                    "checkpoint.async_save": False}, "grid": grid, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_two_run_sweep_completes_is_skipped_when_rerun_and_is_analyzed(tmp_path, capsys):
    path = _write_sweep(tmp_path, {"optim.name": ["muonclip", "adamw"]})
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["name=muonclip", "name=adamw"]
    results = run_sweep(sweep, log=lambda _: None)
    rows = list(csv.DictReader(results.open()))
    assert [r["optim.name"] for r in rows] == ["muonclip", "adamw"]
    for row in rows:
        assert int(row["steps"]) == 4 and int(row["tokens"]) == 4 * 8 * 64
        assert float(row["flops"]) > 0 and math.isfinite(float(row["final_eval_loss"]))
        assert float(row["max_logit"]) > 0 and float(row["wall_time_s"]) > 0
    stamps = [(sweep.out_dir / r.name / "summary.json").stat().st_mtime_ns for r in sweep.runs]
    log = []
    run_sweep(sweep, log=log.append)
    assert all("skipped" in line for line in log)
    assert [(sweep.out_dir / r.name / "summary.json").stat().st_mtime_ns for r in sweep.runs] == stamps
    assert main(["analyze", str(path), "--arm", "optim.name"]) == 0  # two points per arm: tables, no fit
    report = sweep.out_dir / "report"
    assert "name=adamw" in (report / "report.md").read_text()
    for png in ("loss_vs_compute.png", "curves.png"):
        assert (report / png).stat().st_size > 10_000


def test_a_diverged_run_is_a_recorded_result_and_the_sweep_goes_on(tmp_path):
    from k2jax.sweep.analysis import analyze

    path = _write_sweep(tmp_path, {"optim.learning_rate": [0.01, 1e12]}, **{"set": {
        "train.steps": 4, "train.eval_every": 2, "train.log_every": 1, "checkpoint.every": 4,
        "checkpoint.async_save": False, "optim.name": "adamw", "optim.warmup_steps": 0}})
    sweep = load_sweep(path)
    log = []
    rows = list(csv.DictReader(run_sweep(sweep, log=log.append).open()))
    assert [r["optim.learning_rate"] for r in rows] == ["0.01", "1000000000000.0"]
    assert rows[0]["diverged_at"] == "" and math.isfinite(float(rows[0]["final_eval_loss"]))
    assert int(rows[1]["diverged_at"]) >= 1 and rows[1]["final_eval_loss"] == ""
    assert any("diverged at step" in line for line in log)
    log.clear()
    run_sweep(sweep, log=log.append)  # a recorded divergence is finished, not retried
    assert all("skipped" in line for line in log)
    tuning = analyze(sweep.out_dir, best_over="optim.learning_rate")["tuning"]
    assert tuning == [{"setting": {}, "tried": {"0.01": float(rows[0]["final_eval_loss"]), "1000000000000": None},
                       "best": "0.01", "at_edge": True}]
    assert "1000000000000: diverged" in (sweep.out_dir / "report" / "report.md").read_text()


def test_bundled_axes_and_printed_commands(tmp_path):
    path = _write_sweep(tmp_path, {"model.moe.num_experts": [4, 8],
                                   "size": {"s": {"model.d_model": 64}, "m": {"model.d_model": 96}}})
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["num_experts=4-size=s", "num_experts=4-size=m",
                                            "num_experts=8-size=s", "num_experts=8-size=m"]
    assert sweep.config(sweep.runs[3]).model.d_model == 96 and sweep.config(sweep.runs[3]).model.moe.num_experts == 8
    cmds = launch_commands(sweep, "--distributed auto")
    assert len(cmds) == 4 and "--set model.d_model=96" in cmds[3] and cmds[3].endswith("--distributed auto")
    skipped = load_sweep(_write_sweep(tmp_path, {"model.moe.num_experts": [4, 8],
                                                 "size": {"s": {"model.d_model": 64}, "m": {"model.d_model": 96}}},
                                      exclude=[{"model.moe.num_experts": 8, "size": "s"}, {"size": "m"}]))
    assert [r.name for r in skipped.runs] == ["num_experts=4-size=s"]


def test_bad_sweeps_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="model.num_hedas"):
        load_sweep(_write_sweep(tmp_path, {"model.num_hedas": [2]}))
    with pytest.raises(ConfigError, match="grid.optim.name"):
        load_sweep(_write_sweep(tmp_path, {"optim.name": []}))
    with pytest.raises(ConfigError, match="unknown keys"):
        load_sweep(_write_sweep(tmp_path, {"optim.name": ["muon"]}, steps=3))
    with pytest.raises(ConfigError, match=r"exclude names model.moe.num_experts=3, which is not in the grid \(model.moe.num_experts: \[4\]"):
        load_sweep(_write_sweep(tmp_path, {"model.moe.num_experts": [4]}, exclude=[{"model.moe.num_experts": 3}]))
    assert not (tmp_path / "sweep").exists()


def test_fit_recovers_known_power_law_and_multiplier():
    rng = np.random.default_rng(0)
    truth = PowerLawFit(e=1.6, a=0.9, alpha=0.35, cov=np.zeros((3, 3)))
    compute = np.geomspace(1e11, 1e15, 8)
    fit = fit_power_law(compute, truth.loss(compute) + rng.normal(0, 1e-3, compute.size))
    assert fit.e == pytest.approx(1.6, abs=0.02)
    assert fit.a == pytest.approx(0.9, rel=0.05)
    assert fit.alpha == pytest.approx(0.35, rel=0.05)
    # an arm that needs half the compute for every loss: L_arm(C) = L_ref(2C)
    arm = fit_power_law(compute, truth.loss(2 * compute) + rng.normal(0, 1e-3, compute.size))
    target = float(arm.loss(compute[-1]))
    multiplier = compute_multiplier(fit, arm, target)
    assert multiplier == pytest.approx(2.0, rel=0.1)
    low, high = multiplier_interval(fit, arm, target)  # 68% interval from the fits' covariance
    assert low < multiplier < high and high - low < 0.5
    assert abs(multiplier - 2.0) < 1.5 * (high - low)  # the truth is within a few standard errors
    with pytest.raises(ValueError, match=">= 3 runs"):
        fit_power_law(compute[:2], truth.loss(compute[:2]))


def test_curve_analysis_fits_each_runs_held_out_curve(tmp_path):
    """One constant-lr run per arm: its held-out curve is the loss-vs-compute series that is fitted."""
    import json

    from k2jax.sweep.analysis import analyze

    truth = PowerLawFit(e=1.5, a=0.8, alpha=0.4, cov=np.zeros((3, 3)))
    rng = np.random.default_rng(1)
    steps, flops_per_step = 400, 1e10
    rows = []
    for experts, speedup in ((4, 1.0), (16, 1.5)):  # 16 experts reach each loss with 1/1.5 of the compute
        run = f"num_experts={experts}"
        (tmp_path / run).mkdir()
        records = [{"step": s, "loss": 9.0, "max_logit": 5.0} for s in range(10, steps + 1, 10)]
        records += [{"step": s, "eval_loss": float(truth.loss(speedup * s * flops_per_step) + rng.normal(0, 2e-4))}
                    for s in range(25, steps + 1, 25)]
        (tmp_path / run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in sorted(records, key=lambda r: r["step"])))
        rows.append({"run": run, "model.moe.num_experts": experts, "flops": steps * flops_per_step, "steps": steps,
                     "final_eval_loss": records[-1]["eval_loss"]})
    with (tmp_path / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = analyze(tmp_path, arm="model.moe.num_experts", reference="4", curves=True)
    assert set(result["arms"]) == {"4", "16"}
    assert result["arms"]["4"]["alpha"] == pytest.approx(0.4, rel=0.1)
    multiplier = result["multipliers"]["16"]
    assert multiplier["vs"] == "4" and multiplier["value"] == pytest.approx(1.5, rel=0.05)
    low, high = multiplier["interval_68"]
    assert low < multiplier["value"] < high
    shared = result["shared_fit_multipliers"]["16"]  # one curve shape for both arms, 16's compute scaled
    assert shared["value"] == pytest.approx(1.5, rel=0.03)
    assert shared["interval_68"][0] < shared["value"] < shared["interval_68"][1]
    assert "held-out curves" in (tmp_path / "report" / "report.md").read_text()


def test_best_over_an_axis_keeps_each_arms_tuned_run(tmp_path):
    """Two optimizers x four sizes x three learning rates, each loss a known power law of compute
    plus a penalty away from that optimizer's best rate: the analysis keeps the best rate per size
    and recovers the 2x multiplier of the arm whose law is the other's at twice the compute."""
    from k2jax.sweep.analysis import analyze

    truth = PowerLawFit(e=1.5, a=0.8, alpha=0.4, cov=np.zeros((3, 3)))
    best_lr = {"muon": 0.02, "adamw": 0.006}  # muon's best at the end of its range
    rows = []
    for name, speedup in (("muon", 2.0), ("adamw", 1.0)):
        for size, flops in zip(("d64", "d96", "d128", "d192"), np.geomspace(1e11, 1e14, 4)):
            for lr in (0.002, 0.006, 0.02):
                penalty = 0.05 * abs(math.log(lr / best_lr[name]))
                rows.append({"run": f"name={name}-size={size}-learning_rate={lr}", "optim.name": name,
                             "size": size, "optim.learning_rate": lr, "params_total": 1, "flops": flops,
                             "steps": 300, "final_eval_loss": float(truth.loss(speedup * flops)) + penalty})
    with (tmp_path / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = analyze(tmp_path, arm="optim.name", reference="adamw", best_over="optim.learning_rate")
    assert len(result["tuning"]) == 8
    for t in result["tuning"]:
        assert t["best"] == str(best_lr[t["setting"]["optim.name"]]) and len(t["tried"]) == 3
        assert t["at_edge"] == (t["setting"]["optim.name"] == "muon")
    assert result["multipliers"]["muon"]["value"] == pytest.approx(2.0, rel=1e-3)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**0.02: " in report and "edge" in report
    with pytest.raises(ValueError, match="--best-over 'lr' is not an axis.*optim.learning_rate"):
        analyze(tmp_path, arm="optim.name", best_over="lr")


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_sweep_files_load(path):
    """Every run of every committed sweep (CPU and GPU sizes) is a valid config."""
    sweep = load_sweep(path)
    assert len(sweep.runs) >= 3 and len({r.name for r in sweep.runs}) == len(sweep.runs)
