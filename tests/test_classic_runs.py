"""vaco_classic.py run as a user runs it: logged keys, learning, lag, reproducibility, saving, errors, Ctrl-C."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SPEC_KEYS, read_scalars, run_script

SCRIPT = "vaco_classic.py"


def values(scalars, key):
    return np.array([v for _, v in scalars[key]])


@pytest.mark.parametrize("env_args", [
    ["--env-id", "CartPole-v1", "--total-timesteps", 2560, "--policy-lag", 2],
    ["--env-id", "Hopper-v5", "--total-timesteps", 2048, "--num-envs", 1, "--num-steps", 512, "--policy-lag", 1],
], ids=["discrete-CartPole", "continuous-Hopper"])
def test_smoke_run_writes_every_documented_key_and_a_loadable_model(run, tmp_path, env_args):
    result = run(SCRIPT, *env_args, "--save-model", "--eval-episodes", 2)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(tmp_path / "runs")
    assert SPEC_KEYS | {"eval/episodic_return"} <= set(scalars), SPEC_KEYS - set(scalars)
    assert len(scalars["eval/episodic_return"]) == 2
    lag = int(env_args[env_args.index("--policy-lag") + 1])
    assert values(scalars, "charts/policy_lag").tolist() == [min(i, lag) for i in range(len(scalars["charts/SPS"]))]

    checkpoint = torch.load(next((tmp_path / "runs").rglob("*.pt")))
    assert checkpoint["args"]["env_id"] == env_args[1]
    if env_args[1] == "Hopper-v5":  # the policy needs the observation statistics it was trained with
        assert checkpoint["obs_mean"].shape == (11,) and bool((checkpoint["obs_var"] > 0).all())
    assert "step" in result.stdout and "return" in result.stdout and "SPS" in result.stdout


@pytest.fixture(scope="module")
def learning_runs(tmp_path_factory):
    """CartPole at a fixed seed on a small budget, without lag and with two iterations of simulated lag."""
    runs = {}
    procs = {}
    for lag in (0, 2):
        folder = tmp_path_factory.mktemp(f"lag{lag}")
        args = ["--seed", 1, "--total-timesteps", 100_000, "--policy-lag", lag]
        procs[lag] = (folder, subprocess.Popen(
            [sys.executable, str(ROOT / SCRIPT), *map(str, args)], cwd=folder, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for lag, (folder, proc) in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        runs[lag] = read_scalars(folder / "runs")
    return runs


@pytest.mark.parametrize("lag", [0, 2])
def test_cartpole_learns_with_and_without_lag(learning_runs, lag):
    scalars = learning_runs[lag]
    steps, returns = np.array(scalars["charts/episodic_return"]).T
    last = returns[steps >= 0.9 * steps.max()]
    assert returns[:20].mean() < 50, "an untrained policy should not already balance the pole"
    assert last.mean() >= 195, f"mean return over the last 10% of steps: {last.mean():.1f}"


def test_lag_is_what_the_flag_says(learning_runs):
    no_lag, lagged = learning_runs[0], learning_runs[2]
    assert set(values(no_lag, "charts/policy_lag")) == {0}
    assert values(lagged, "charts/policy_lag")[2:].min() == 2
    # pi_T = beta without lag: ratio 1 up to float rounding; with lag the behavior policy is really stale
    assert values(no_lag, "align/tv_behavior").max() < 1e-5
    assert values(no_lag, "align/rho_clipped_frac").max() < 0.02  # rounding can put rho a hair above 1
    assert np.median(values(lagged, "align/tv_behavior")[2:]) > 1e-3


def test_same_seed_gives_identical_losses_and_another_seed_does_not(run, tmp_path):
    logs = []
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        (tmp_path / name).mkdir()
        result = run_script(SCRIPT, "--seed", seed, "--total-timesteps", 1536, "--policy-lag", 1, cwd=tmp_path / name)
        assert result.returncode == 0, result.stderr
        scalars = read_scalars(tmp_path / name / "runs")
        logs.append({k: values(scalars, k) for k in ("losses/policy_loss", "losses/value_loss", "losses/tv")})
    for key in logs[0]:
        np.testing.assert_array_equal(logs[0][key], logs[1][key])
    assert not np.array_equal(logs[0]["losses/value_loss"], logs[2]["losses/value_loss"])


def test_help_lists_the_vaco_flags(run):
    result = run(SCRIPT, "--help")
    assert result.returncode == 0
    for flag in ["--tv-delta", "--rho-bar", "--c-bar", "--realign", "--no-realign", "--policy-loss", "--clip-coef",
                 "--policy-lag", "--save-model", "--eval-episodes"]:
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args,message", [
    (["--tv-delta", 0], "--tv-delta must be > 0"),
    (["--rho-bar", 0.5, "--c-bar", 1.0], "--rho-bar (0.5) must be >= --c-bar (1.0)"),
    (["--rho-bar", 0, "--c-bar", 0], "--rho-bar and --c-bar must be > 0"),
    (["--num-minibatches", 3], "does not split into --num-minibatches 3"),
    (["--env-id", "NoSuchEnv-v0"], "unknown --env-id 'NoSuchEnv-v0'"),
    (["--policy-lag", -1], "--policy-lag must be >= 0"),
    (["--env-id", "Blackjack-v1"], "needs vector observations"),
], ids=["tv-delta", "rho-below-c", "rho-zero", "minibatches", "env-id", "lag", "tuple-obs"])
def test_bad_input_stops_with_one_line_before_training(run, tmp_path, args, message):
    result = run(SCRIPT, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists(), "nothing should be logged before the input is checked"


def test_unsupported_action_space_is_named(tmp_path):
    code = (
        "import gymnasium as gym, numpy as np, runpy, sys\n"
        "class Toy(gym.Env):\n"
        "    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)\n"
        "    action_space = gym.spaces.MultiDiscrete([2, 3])\n"
        "gym.register('MultiDiscreteToy-v0', entry_point=Toy)\n"
        "sys.argv = ['vaco_classic.py', '--env-id', 'MultiDiscreteToy-v0']\n"
        f"runpy.run_path({str(ROOT / SCRIPT)!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "only Discrete and Box actions work" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_keeps_the_logs_and_saves_the_model(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), "--save-model", "--total-timesteps", "10000000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first progress line: training is under way
        if proc.stdout.readline().startswith("step"):
            break
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)  # the current iteration ends, then the model is saved
    assert proc.returncode == 130, output
    assert "interrupted at step" in output
    checkpoint = torch.load(next((tmp_path / "runs").rglob("*.pt")))
    assert "model" in checkpoint
    assert len(read_scalars(tmp_path / "runs")["losses/tv"]) >= 10
