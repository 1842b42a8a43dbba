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


def benchmark(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "tests" / "benchmark_lag.py"), "--out", str(tmp_path / "runs"), "--jobs", "2",
           "--summaries", str(tmp_path / "summaries"), "--env-ids", "CartPole-v1", "--seeds", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_runs_each_method_and_variant_once_and_reports_them(tmp_path):
    args = ["--methods", "vaco", "ppo-noalign", "--lags", "0", "--variants", "default", "tv-delta=0.4,rho-bar=2",
            "--extra", TINY, "--results-dir", str(tmp_path / "results"), "--results-name", "{env}_sweep"]
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
        assert summary["final"] == pytest.approx(values[steps >= 0.9 * 2048].mean())
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
    assert again.stdout.count("| 1 |") == len(names)
    assert "| vaco | 0 | 123.4 ± 0.0 |" in again.stdout
    assert not (tmp_path / "runs").exists()

    # --report-only runs nothing: the tables hold what the summaries have and name the runs still missing
    partial = benchmark(tmp_path, *args[:-4], "--seeds", "1", "2", "--report-only")
    assert partial.returncode == 0 and "done" not in partial.stdout, partial.stdout + partial.stderr
    assert "| vaco | 0 | 123.4 ± 0.0 |" in partial.stdout and "--report-only" not in partial.stdout
    missing = ", ".join(f"CartPole-v1__{n}__lag0__s2" for n in ["vaco", "vaco+tv-delta=0.4,rho-bar=2", "ppo-noalign",
                                                                "ppo-noalign+tv-delta=0.4,rho-bar=2"])
    assert f"No summary yet for 4 of the grid's 8 runs: {missing}" in partial.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_real_lag_summary_holds_the_lag_of_every_trained_rollout(tmp_path):
    """vaco_async_mp.py: the summary keeps the lag distribution the script prints, and the per-seed table shows it."""
    result = benchmark(tmp_path, "--script", str(ROOT / "vaco_async_mp.py"), "--lags", "async", "--methods", "vaco",
                       "--per-seed", "--extra", "--num-actors 2 --num-steps 64 --total-timesteps 2048")
    assert result.returncode == 0, result.stdout + result.stderr
    summary_file = tmp_path / "summaries" / "num-actors=2,num-steps=64,total-timesteps=2048" / \
        "CartPole-v1__vaco__lagasync__s1.json"
    lag = json.loads(summary_file.read_text())["lag"]
    printed = (tmp_path / "runs" / "CartPole-v1__vaco__lagasync__s1" / "stdout.txt").read_text().splitlines()[-1]
    assert printed == "policy lag of the trained rollouts (versions: count): " + str(
        {int(k): v for k, v in lag["rollouts"].items()})
    assert sum(lag["rollouts"].values()) == 2048 // (2 * 64)  # every rollout (2 envs per actor x 64 steps), once
    assert max(int(k) for k in lag["rollouts"]) == lag["max"]
    assert "rollouts by lag " + ", ".join(f"{k}: {v}" for k, v in lag["rollouts"].items()) in result.stdout


def test_the_lag_must_fit_the_script(tmp_path):
    wrong = benchmark(tmp_path, "--methods", "vaco", "--lags", "async")
    assert wrong.returncode != 0 and "integers" in wrong.stderr
    wrong = benchmark(tmp_path, "--methods", "vaco", "--lags", "0", "--script", str(ROOT / "vaco_async_mp.py"))
    assert wrong.returncode != 0 and "only 'async'" in wrong.stderr
    assert not (tmp_path / "runs").exists()


def test_malformed_variant_fails_before_any_run(tmp_path):
    result = benchmark(tmp_path, "--methods", "vaco", "--lags", "0", "--variants", "tv-delta")
    assert result.returncode != 0 and "NAME=VALUE" in result.stderr
    assert not (tmp_path / "runs").exists()
