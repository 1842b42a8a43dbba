"""The opt-in lag benchmark's runner, on a tiny budget: run folders and flags, the summaries, the report, resuming."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, read_scalars

TINY = "--total-timesteps 2048 --num-steps 128"  # 4 iterations of 4 envs x 128 steps
sys.path.insert(0, str(ROOT / "tests"))
import benchmark_lag  # noqa: E402  (the runner as a module, for its summary and its table on hand-made data)


def benchmark(tmp_path, *args):
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "benchmark_lag.py"),
        "--out",
        str(tmp_path / "runs"),
        "--jobs",
        "2",
        "--summaries",
        str(tmp_path / "summaries"),
        "--env-ids",
        "CartPole-v1",
        "--seeds",
        "1",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")
    )


@pytest.mark.slow  # real runs of the scripts, two at a time
def test_runs_each_method_and_variant_once_and_reports_them(tmp_path):
    """One run per method and variant with the flags they name, a summary of each that agrees with its event file, a
    report; then a rerun and --report-only, which read the summaries alone and run nothing."""
    args = [
        "--methods",
        "vaco",
        "ppo-noalign",
        "--lags",
        "0",
        "--variants",
        "default",
        "tv-delta=0.4,rho-bar=2",
        "--extra",
        TINY,
        "--results-dir",
        str(tmp_path / "results"),
        "--results-name",
        "{env}_sweep",
    ]
    first = benchmark(tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["vaco", "vaco+tv-delta=0.4,rho-bar=2", "ppo-noalign", "ppo-noalign+tv-delta=0.4,rho-bar=2"]
    summaries = tmp_path / "summaries" / "total-timesteps=2048,num-steps=128"  # named after --extra
    assert sorted(p.name for p in summaries.iterdir()) == sorted(f"CartPole-v1__{n}__lag0__s1.json" for n in names)
    for name in names:
        run_dir = tmp_path / "runs" / f"CartPole-v1__{name}__lag0__s1"
        summary = json.loads((summaries / f"CartPole-v1__{name}__lag0__s1.json").read_text())
        assert summary["cmd"].startswith("python vaco_classic.py --env-id CartPole-v1 --seed 1 --policy-lag 0 ")
        assert summary["lag"] == {"mean": 0.0, "max": 0.0, "q10_50_90": [0.0, 0.0, 0.0]}
        assert ("--tv-delta 0.4 --rho-bar 2" in summary["cmd"]) == ("+" in name)
        assert ("--policy-loss ppo --no-realign" in summary["cmd"]) == name.startswith("ppo")
        # the summary against the event file: final = mean return of the episodes in the last 10% of the steps
        returns = read_scalars(run_dir)["charts/episodic_return"]
        steps, values = np.array([s for s, _ in returns]), np.array([v for _, v in returns])
        assert summary["final"] == pytest.approx(values[steps >= 0.9 * 2048].mean())  # the same mean: rounding only
        assert values.min() <= summary["auc"] <= values.max()
    report = (tmp_path / "results" / "CartPole-v1_sweep.md").read_text()
    for name in names:
        assert f"| {name} | 0 |" in report
    assert "done" in first.stdout

    # resuming reads the summaries alone: without the run folders nothing runs again, and the report shows what the
    # summary files say (one is edited here to tell its number apart)
    shutil.rmtree(tmp_path / "runs")
    edited = summaries / "CartPole-v1__vaco__lag0__s1.json"
    edited.write_text(json.dumps(dict(json.loads(edited.read_text()), auc=123.4)))
    again = benchmark(tmp_path, *args)
    assert again.returncode == 0 and "done" not in again.stdout, again.stdout + again.stderr
    assert again.stdout.split("What the filter did")[0].count("| 1 |") == len(names)  # the AUC table's rows
    assert "| vaco | 0 | 123.4 | " in again.stdout
    assert not (tmp_path / "runs").exists()

    # --report-only runs nothing: the tables hold what the summaries have and name the runs still missing
    partial = benchmark(tmp_path, *args[:-4], "--seeds", "1", "2", "--report-only")
    assert partial.returncode == 0 and "done" not in partial.stdout, partial.stdout + partial.stderr
    assert "| vaco | 0 | 123.4 | " in partial.stdout and "--report-only" not in partial.stdout
    missing = ", ".join(
        f"CartPole-v1__{n}__lag0__s2"
        for n in ["vaco", "vaco+tv-delta=0.4,rho-bar=2", "ppo-noalign", "ppo-noalign+tv-delta=0.4,rho-bar=2"]
    )
    assert f"No summary yet for 4 of the grid's 8 runs: {missing}" in partial.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_real_lag_summary_holds_the_lag_of_every_trained_rollout(tmp_path):
    """vaco_async_mp.py, named as the studies' commands name it (relative to the repository's root, while each run
    starts in its own folder): the summary keeps the lag distribution the script prints, and the per-seed table
    shows it."""
    result = benchmark(
        tmp_path,
        "--script",
        "vaco_async_mp.py",
        "--lags",
        "async",
        "--methods",
        "vaco",
        "--per-seed",
        "--extra",
        "--num-actors 2 --num-steps 64 --total-timesteps 2048",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary_file = (
        tmp_path / "summaries" / "num-actors=2,num-steps=64,total-timesteps=2048" / "CartPole-v1__vaco__lagasync__s1.json"
    )
    lag = json.loads(summary_file.read_text())["lag"]
    printed = (tmp_path / "runs" / "CartPole-v1__vaco__lagasync__s1" / "stdout.txt").read_text().splitlines()[-1]
    assert printed == "policy lag of the trained rollouts (versions: count): " + str(
        {int(k): v for k, v in lag["rollouts"].items()}
    )
    assert sum(lag["rollouts"].values()) == 2048 // (2 * 64)  # every rollout (2 envs per actor x 64 steps), once
    assert max(int(k) for k in lag["rollouts"]) == lag["max"]
    assert "rollouts by lag " + ", ".join(f"{k}: {v}" for k, v in lag["rollouts"].items()) in result.stdout


def test_the_lag_must_fit_the_script(tmp_path):
    """--lags async only with vaco_async_mp.py and integer lags only with the others, refused before any run."""
    wrong = benchmark(tmp_path, "--methods", "vaco", "--lags", "async")
    assert wrong.returncode != 0 and "integers" in wrong.stderr
    wrong = benchmark(tmp_path, "--methods", "vaco", "--lags", "0", "--script", str(ROOT / "vaco_async_mp.py"))
    assert wrong.returncode != 0 and "only 'async'" in wrong.stderr
    assert not (tmp_path / "runs").exists()


def test_malformed_variant_fails_before_any_run(tmp_path):
    result = benchmark(tmp_path, "--methods", "vaco", "--lags", "0", "--variants", "tv-delta")
    assert result.returncode != 0 and "NAME=VALUE" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_auc_is_the_trapezoid_over_unevenly_spaced_episodes_divided_by_their_span(tmp_path):
    """The headline metric on a series worked out by hand. Episodes end at steps 0, 10, 40 and 100 with returns 100,
    0, 0 and 40: trapezoids 10·50 + 30·0 + 60·20 = 1700 over the span of 100 steps, AUC 17.0. Each wrong average
    gives another number: the unweighted mean of the points 35.0, of the segment midpoints 23.3, without the first
    point 13.3, without the last 12.5, left or right sums 10.0 or 24.0, over --total-timesteps (200) instead of the
    span 8.5. Final: the mean of the episodes in the last 10% of the steps, here the one at step 100."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step, episodic_return in [(0, 100.0), (10, 0.0), (40, 0.0), (100, 40.0)]:
        writer.add_scalar("charts/episodic_return", episodic_return, step)
    writer.close()
    summary = benchmark_lag.summarize(tmp_path / "run", total_steps=100)
    assert summary["auc"] == pytest.approx(17.0, abs=1e-9)  # float64 sums of a few exact numbers: rounding ~1e-15
    assert summary["final"] == 40.0 and summary["episodes"] == 4 and summary["lag"] is None  # exact: one episode
    assert benchmark_lag.summarize(tmp_path / "run", total_steps=200)["auc"] == pytest.approx(17.0, abs=1e-9)


def test_tables_show_mean_and_sample_std_and_say_so():
    """± is the sample standard deviation (ddof = 1): AUC 10, 20, 60 has mean 30 and std 26.5 (ddof = 0 would be
    21.6); the table says what ± is; a single seed shows its value without a spread."""
    results = {
        benchmark_lag.run_tag("CartPole-v1", "vaco", "default", 0, s): dict(
            auc=a, final=a + 1, sps=100.0, wall_s=10.0, lag=None
        )
        for s, a in [(1, 10.0), (2, 20.0), (3, 60.0)]
    }
    report = benchmark_lag.markdown_report(results, "CartPole-v1", ["vaco"], [0], [1, 2, 3], False, "cmd")
    assert "| vaco | 0 | 30.0 ± 26.5 | 31.0 ± 26.5 | – | 100 | 3 |" in report
    assert "mean ± sample standard deviation (ddof = 1)" in report
    one = benchmark_lag.markdown_report(results, "CartPole-v1", ["vaco"], [0], [3], False, "cmd")
    assert "| vaco | 0 | 60.0 | 61.0 | – | 100 | 1 |" in one


def test_summaries_record_what_the_filter_did_and_the_table_shows_it(tmp_path):
    """The gate statistics are the run's per-iteration values averaged over the iterations, and the filter table
    averages them over the seeds; a run without charts/tv_delta (older script) shows – for the bound."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    logged = {
        "losses/filter_gate_frac": [0.0, 0.5, 1.0],
        "losses/filtered_frac": [0.0, 0.1, 0.2],
        "align/tv_behavior": [0.0, 0.05, 0.1],
        "losses/tv": [0.1, 0.1, 0.4],
        "charts/tv_delta": [0.2, 0.3, 0.4],
    }
    for key, series in logged.items():
        for step, value in enumerate(series):
            writer.add_scalar(key, value, 2048 * (step + 1))
    writer.add_scalar("charts/episodic_return", 1.0, 10)
    writer.close()
    gate = benchmark_lag.summarize(tmp_path / "run", total_steps=6144)["gate"]
    # means of values the log stores as float32 (0.1 is 1.5e-8 off): approx's 1e-6 relative
    assert gate == pytest.approx({"closed": 0.5, "dropped": 0.1, "tv_behavior": 0.05, "tv": 0.2, "tv_delta": 0.3})
    old = dict(gate, closed=1.0)
    del old["tv_delta"]
    results = {
        benchmark_lag.run_tag("Hopper-v5", "vaco", "default", 8, s): dict(
            auc=1.0, final=1.0, sps=1.0, wall_s=1.0, lag=None, gate=g
        )
        for s, g in [(1, gate), (2, old)]
    }
    report = benchmark_lag.markdown_report(results, "Hopper-v5", ["vaco"], [8], [1, 2], False, "cmd")
    assert "| vaco | 8 | 0.750 | 0.100 | 0.050 | 0.200 | – | 2 |" in report
    only_new = benchmark_lag.markdown_report(results, "Hopper-v5", ["vaco"], [8], [1], False, "cmd")
    assert "| vaco | 8 | 0.500 | 0.100 | 0.050 | 0.200 | 0.300 | 1 |" in only_new


def test_only_variants_that_set_delta_alone_are_points_of_a_delta_sweep():
    """delta_of parses the variant's number, so the comparisons are exact."""
    assert benchmark_lag.delta_of("default", 0.2) == 0.2
    assert benchmark_lag.delta_of("tv-delta=0.05", 0.2) == 0.05
    assert benchmark_lag.delta_of("tv-delta=0.4,rho-bar=2", 0.2) is None
    assert benchmark_lag.delta_of("tv-delta-rule=forward", 0.2) is None
