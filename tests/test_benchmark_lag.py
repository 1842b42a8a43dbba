"""The opt-in lag benchmark's runner, on a tiny budget: run folders and flags, the summaries, the report, resuming."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, read_scalars

TINY = "--total-timesteps 2048 --num-steps 128"  # 4 iterations of 4 envs x 128 steps


def benchmark(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "tests" / "benchmark_lag.py"), "--out", str(tmp_path / "runs"), "--jobs", "2",
           "--env-ids", "CartPole-v1", "--lags", "0", "--seeds", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_runs_each_method_and_variant_once_and_reports_them(tmp_path):
    args = ["--methods", "vaco", "ppo-noalign", "--variants", "default", "tv-delta=0.4,rho-bar=2",
            "--extra", TINY, "--results-dir", str(tmp_path / "results"), "--results-name", "{env}_sweep"]
    first = benchmark(tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["vaco", "vaco+tv-delta=0.4,rho-bar=2", "ppo-noalign", "ppo-noalign+tv-delta=0.4,rho-bar=2"]
    for name in names:
        run_dir = tmp_path / "runs" / f"CartPole-v1__{name}__lag0__s1"
        summary = json.loads((run_dir / "summary.json").read_text())
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

    again = benchmark(tmp_path, *args)  # resumes: every run is finished, nothing runs again
    assert again.returncode == 0 and "done" not in again.stdout, again.stdout + again.stderr
    assert again.stdout.count("| 1 |") == len(names)


def test_malformed_variant_fails_before_any_run(tmp_path):
    result = benchmark(tmp_path, "--methods", "vaco", "--variants", "tv-delta")
    assert result.returncode != 0 and "NAME=VALUE" in result.stderr
    assert not (tmp_path / "runs").exists()
