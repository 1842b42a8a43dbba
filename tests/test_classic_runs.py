"""vaco_classic.py run as a user runs it: logged keys, learning, lag, the loss variants, reproducibility on any thread
count, saving, bad flags, Ctrl-C."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SPEC_KEYS, flag_error, read_scalars, run_main, run_script, start_script, values

SCRIPT = "vaco_classic.py"
LOSS_KEYS = ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/tv"]


def logged(folder, *args, monkeypatch=None):
    """Run the script in `folder` and return what it logged: in its own process, or with `monkeypatch` in this one
    (no interpreter start-up; the script seeds everything itself, so both give the same run)."""
    folder.mkdir(exist_ok=True)
    if monkeypatch is None:
        result = run_script(SCRIPT, *args, cwd=folder)
        assert result.returncode == 0, result.stderr
    else:
        error, _ = run_main(SCRIPT, *args, cwd=folder, monkeypatch=monkeypatch)
        assert error is None, error
    return read_scalars(folder / "runs")


@pytest.mark.parametrize(
    "env_args",
    [
        ["--env-id", "CartPole-v1", "--total-timesteps", 2560, "--policy-lag", 2],
        ["--env-id", "Hopper-v5", "--total-timesteps", 2048, "--num-envs", 1, "--num-steps", 512, "--policy-lag", 1],
    ],
    ids=["discrete-CartPole", "continuous-Hopper"],
)
def test_smoke_run_writes_every_documented_key_and_a_loadable_model(run, tmp_path, env_args):
    result = run(SCRIPT, *env_args, "--save-model", "--eval-episodes", 2)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(tmp_path / "runs")
    assert SPEC_KEYS | {"eval/episodic_return", "charts/kl_coef"} <= set(scalars), SPEC_KEYS - set(scalars)
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
    """CartPole at a fixed seed on a small budget, without lag and with two iterations of simulated lag, side by side
    on the two cores."""
    folders = {lag: tmp_path_factory.mktemp(f"lag{lag}") for lag in (0, 2)}
    with ThreadPoolExecutor(2) as pool:
        results = dict(
            zip(
                folders,
                pool.map(
                    lambda lag: run_script(
                        SCRIPT, "--seed", 1, "--total-timesteps", 100_000, "--policy-lag", lag, cwd=folders[lag]
                    ),
                    folders,
                ),
            )
        )
    for result in results.values():
        assert result.returncode == 0, result.stderr
    return {lag: read_scalars(folder / "runs") for lag, folder in folders.items()}


@pytest.mark.slow
@pytest.mark.parametrize("lag", [0, 2])
def test_cartpole_learns_with_and_without_lag(learning_runs, lag):
    """The mean return over the last 10% of 100k steps is several times an untrained policy's (~30). One seed's value
    there depends on the CPU's rounding (the studies page, "What one seed tells you"), so the bar is learning, not
    CartPole's 195."""
    scalars = learning_runs[lag]
    steps, returns = np.array(scalars["charts/episodic_return"]).T
    last = returns[steps >= 0.9 * steps.max()]
    assert returns[:20].mean() < 50, "an untrained policy should not already balance the pole"
    assert last.mean() >= 100, f"mean return over the last 10% of steps: {last.mean():.1f}"


@pytest.mark.slow
def test_lag_is_what_the_flag_says(learning_runs):
    """charts/policy_lag follows --policy-lag, and pi_T differs from beta by rounding alone without lag."""
    no_lag, lagged = learning_runs[0], learning_runs[2]
    assert set(values(no_lag, "charts/policy_lag")) == {0}
    assert values(lagged, "charts/policy_lag")[2:].min() == 2
    # pi_T = beta without lag: each ratio is 1 up to the rounding of two float32 log-probs of O(1) (~1e-7), so their
    # means stay far under 1e-5; with lag the behavior policy is really stale, 100x above that
    assert values(no_lag, "align/tv_behavior").max() < 1e-5
    assert np.abs(values(no_lag, "align/rho_mean") - 1).max() < 1e-5  # rounding puts some rho a hair above 1
    assert np.median(values(lagged, "align/tv_behavior")[2:]) > 1e-3


def test_same_seed_gives_identical_losses_and_another_seed_does_not(tmp_path, monkeypatch):
    """A run of its own process and a run inside this one, at the same seed, log the same losses to the last digit;
    another seed does not."""
    logs = [logged(tmp_path / "a", "--seed", 7, "--total-timesteps", 1536, "--policy-lag", 1)]
    logs += [
        logged(tmp_path / name, "--seed", seed, "--total-timesteps", 1536, "--policy-lag", 1, monkeypatch=monkeypatch)
        for name, seed in [("b", 7), ("c", 8)]
    ]
    for key in LOSS_KEYS:  # exact: the script seeds everything and runs torch on one thread, in or out of process
        np.testing.assert_array_equal(values(logs[0], key), values(logs[1], key))
    assert not np.array_equal(values(logs[0], "losses/value_loss"), values(logs[2], "losses/value_loss"))


def test_the_thread_count_of_the_machine_does_not_change_a_run(tmp_path):
    """A run does not depend on OMP_NUM_THREADS: the script runs torch on one thread, because a sum split over
    threads rounds differently and CartPole turns a last-digit difference into other returns. Exact by construction."""
    logs = []
    for threads in ("1", "2"):  # the environment chooses the thread count
        (tmp_path / threads).mkdir()
        result = run_script(
            SCRIPT,
            "--total-timesteps",
            "5120",
            cwd=tmp_path / threads,
            env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        )
        assert result.returncode == 0, result.stderr
        logs.append(read_scalars(tmp_path / threads / "runs"))
    for key in LOSS_KEYS + ["losses/explained_variance"]:
        np.testing.assert_array_equal(values(logs[0], key), values(logs[1], key), err_msg=key)


# How far apart two runs may log a loss when they differ only by float rounding: a float32 log-prob moves by ~1e-7
# when it is computed in a batch instead of one step at a time, and the updates of a 4-iteration run carry that
# along. Each key's tolerance is 1e-6 (~10 roundings of an O(1) float32) times what its per-sample terms move per
# unit of log-prob, midway (in ratio) between the rounding seen on several CPUs and what a 1% change of the learner
# anchor's weight moves (the studies page, "What one seed tells you"). Relative only where the terms are positive.
ROUNDING_TOLERANCE = {
    "losses/policy_loss": dict(rtol=0, atol=1e-6),  # mean of A r: O(1) terms (normalized A) that cancel to ~1e-3
    "losses/value_loss": dict(rtol=1e-5, atol=0),  # mean of positive squares, O(10)
    "losses/entropy": dict(rtol=1e-5, atol=0),  # positive, ~0.69
    "losses/approx_kl": dict(rtol=0, atol=1e-8),  # r - 1 - log r moves by |r - 1| (~1e-2) per unit of log-prob
    "losses/tv": dict(rtol=0, atol=1e-6),  # 0.5 |r - 1| moves by 0.5 r per unit of log-prob
}


def test_learner_anchor_is_the_default_without_lag(tmp_path, monkeypatch):
    """--tv-anchor learner takes the ratio against pi_T and weights the advantages by min(rho_bar, pi_T / beta). At
    lag 0, pi_T = beta up to the float rounding that separates pi_T's batched log-probs from beta's per-step ones, so
    every logged loss is the default's up to that rounding (bit-identical on some CPUs, not on all). That the weight
    and the anchor are exactly the spec's under lag is checked step by step in test_spec_functions.py."""
    runs = {
        anchor: logged(tmp_path / anchor, "--total-timesteps", 2048, "--tv-anchor", anchor, monkeypatch=monkeypatch)
        for anchor in ("behavior", "learner")
    }
    for key in LOSS_KEYS:
        default, learner = values(runs["behavior"], key), values(runs["learner"], key)
        assert len(default) == len(learner) == 4, key
        np.testing.assert_allclose(learner, default, **ROUNDING_TOLERANCE[key], err_msg=key)


def test_ppo_kl_logs_its_coefficient_fixed_or_adapted_by_the_ppo_rule(tmp_path, monkeypatch):
    fixed = logged(
        tmp_path / "fixed", "--policy-loss", "ppo-kl", "--kl-coef", 0.3, "--total-timesteps", 2560, monkeypatch=monkeypatch
    )
    assert values(fixed, "charts/kl_coef").tolist() == pytest.approx([0.3] * 5)  # logged as float32: 1e-8 relative
    adaptive = logged(
        tmp_path / "adaptive",
        "--policy-loss",
        "ppo-kl",
        "--kl-target",
        0.002,
        "--policy-lag",
        2,
        "--total-timesteps",
        5120,
        monkeypatch=monkeypatch,
    )
    coef, kl = values(adaptive, "charts/kl_coef"), values(adaptive, "losses/approx_kl")
    expected = [0.1]
    for k in kl[:-1]:  # x2 above 1.5 targets, /2 below target / 1.5, from the iteration's mean KL against beta
        expected.append(expected[-1] * (2 if k > 0.003 else 0.5 if k < 0.002 / 1.5 else 1))
    assert coef == pytest.approx(expected, rel=1e-6)  # x2 and /2 are exact; the log stores float32 (6e-8 relative)
    assert {0.5, 2.0} <= set(np.round(coef[1:] / coef[:-1], 6)), f"the coefficient should move both ways: {coef}"


def test_the_forward_rule_logs_delta_plus_the_backward_lag_and_fixed_logs_delta(tmp_path, monkeypatch):
    """charts/tv_delta, the bound FILTER used: --tv-delta itself by default, and with --tv-delta-rule forward --tv-delta
    plus the batch's L1 mean|pi_T/beta - 1| = 2 x align/tv_behavior, which lag 2 makes larger than delta; at lag 0
    the forward rule runs the default's iterations (the bound differs only by float rounding)."""
    fixed = logged(
        tmp_path / "fixed", "--tv-delta", 0.1, "--policy-lag", 2, "--total-timesteps", 2560, monkeypatch=monkeypatch
    )
    assert values(fixed, "charts/tv_delta").tolist() == pytest.approx([0.1] * 5, rel=1e-7)  # float32 0.1: 1.5e-8 off
    forward = logged(
        tmp_path / "forward",
        "--tv-delta",
        0.1,
        "--tv-delta-rule",
        "forward",
        "--policy-lag",
        2,
        "--total-timesteps",
        2560,
        monkeypatch=monkeypatch,
    )
    bound, lag_tv = values(forward, "charts/tv_delta"), values(forward, "align/tv_behavior")
    assert bound == pytest.approx(0.1 + 2 * lag_tv, rel=1e-6)  # the same mean on both sides, each logged as float32
    assert (bound[1:] > 0.1 + 1e-3).all(), f"lag 2 should widen the bound after the first iteration: {bound}"
    no_lag = {
        rule: logged(tmp_path / f"{rule}0", "--tv-delta-rule", rule, "--total-timesteps", 2048, monkeypatch=monkeypatch)
        for rule in ("fixed", "forward")
    }
    # at lag 0 the bound adds mean|pi_T / beta - 1|, whose terms are log-prob rounding (~1e-7 each in float32)
    assert values(no_lag["forward"], "charts/tv_delta") == pytest.approx([0.2] * 4, abs=1e-5)
    # exact by construction: the rule changes only the bound, by ~1e-9, which a minibatch's mean|r - 1| compares with;
    # no gate decision changes unless that mean lies within 1e-9 of delta, so the two runs are the same run
    for key in LOSS_KEYS:
        np.testing.assert_array_equal(values(no_lag["forward"], key), values(no_lag["fixed"], key), err_msg=key)


def test_help_lists_the_vaco_flags(tmp_path, monkeypatch, capsys):
    error, _ = run_main(SCRIPT, "--help", cwd=tmp_path, monkeypatch=monkeypatch)
    assert error.code == 0
    help_text = capsys.readouterr().out
    for flag in [
        "--tv-delta",
        "--rho-bar",
        "--c-bar",
        "--realign",
        "--no-realign",
        "--policy-loss",
        "--clip-coef",
        "--kl-coef",
        "--kl-target",
        "--tv-anchor",
        "--tv-delta-rule",
        "ppo-kl",
        "--policy-lag",
        "--save-model",
        "--eval-episodes",
    ]:
        assert flag in help_text, flag


BAD_FLAGS = [
    (["--gamma", 1.5], "--gamma must be in [0, 1] (got 1.5)"),
    (["--gae-lambda", -0.1], "--gae-lambda must be in [0, 1] (got -0.1)"),
    (["--learning-rate", -1], "--learning-rate must be > 0 (got -1.0)"),
    (["--ent-coef", -0.01], "--ent-coef must be >= 0 (got -0.01)"),
    (["--vf-coef", -1], "--vf-coef must be >= 0"),
    (["--kl-coef", -1], "--kl-coef must be >= 0"),
    (["--kl-target", -0.01], "--kl-target must be >= 0"),
    (["--max-grad-norm", 0], "--max-grad-norm must be > 0 (got 0.0)"),
    (["--clip-coef", 0], "--clip-coef must be > 0"),
    (["--tv-delta", 0], "--tv-delta must be > 0 (got 0.0)"),
    (["--rho-bar", 0, "--c-bar", 0], "--rho-bar must be > 0"),
    (["--rho-bar", 0.5, "--c-bar", 1.0], "--c-bar must be in (0, --rho-bar] = (0, 0.5]"),
    (["--num-envs", 0], "--num-envs must be >= 1 (got 0)"),
    (["--num-steps", 0], "--num-steps must be >= 1"),
    (["--update-epochs", 0], "--update-epochs must be >= 1"),
    (["--num-minibatches", 0], "--num-minibatches must be a divisor of 512 (got 0)"),
    (["--num-minibatches", 3], "--num-minibatches must be a divisor of 512 (got 3)"),
    (["--total-timesteps", 100], "--total-timesteps must be >= one batch"),
    (["--policy-lag", -1], "--policy-lag must be >= 0"),
    (["--eval-episodes", -1], "--eval-episodes must be >= 0"),
    (["--seed", -1], "--seed must be in [0, 2**32)"),
    (["--env-id", "NoSuchEnv-v0"], "--env-id NoSuchEnv-v0: Environment `NoSuchEnv` doesn't exist"),
    (
        ["--env-id", "FrozenLake-v1"],
        "FrozenLake-v1 has Discrete(16) observations, Discrete(4) actions; "
        "vaco_classic.py takes vector (1-D Box) observations",
    ),
    (["--env-id", "Blackjack-v1"], "Blackjack-v1 has Tuple(Discrete(32), Discrete(11), Discrete(2)) observations"),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS, ids=[" ".join(map(str, args)) for args, _ in BAD_FLAGS])
def test_bad_flag_is_refused_with_one_line_naming_it(args, message):
    """check_args, in-process (tyro parses the flags as the command line does): one 'error: ' line with the flag,
    its valid range and the value given."""
    assert message in flag_error(SCRIPT, *args)


@pytest.mark.parametrize("args", [["--gamma", 1.5], ["--env-id", "Blackjack-v1"]], ids=["range", "spaces"])
def test_a_refused_run_prints_one_line_and_creates_nothing(run, tmp_path, args):
    """End to end: the same line reaches stderr, without a traceback, before the runs/ folder exists."""
    result = run(SCRIPT, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == flag_error(SCRIPT, *args), result.stderr
    assert not (tmp_path / "runs").exists(), "nothing should be written before the input is checked"


def test_unsupported_action_space_is_named():
    class Toy(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
        action_space = gym.spaces.MultiDiscrete([2, 3])

    gym.register("MultiDiscreteToy-v0", entry_point=Toy)
    try:
        message = flag_error(SCRIPT, "--env-id", "MultiDiscreteToy-v0")
    finally:
        del gym.registry["MultiDiscreteToy-v0"]
    assert "MultiDiscrete([2 3]) actions; vaco_classic.py takes" in message and "Discrete or Box actions" in message


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_keeps_the_logs_and_saves_the_model(tmp_path, sig):
    proc = start_script(SCRIPT, "--save-model", "--total-timesteps", 10_000_000, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first progress line: training is under way
        if proc.stdout.readline().startswith("step"):
            break
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)  # the current iteration ends, then the model is saved
    assert proc.returncode == 130, output
    assert "interrupted at step" in output and "Traceback" not in output
    checkpoint = torch.load(next((tmp_path / "runs").rglob("*.pt")))
    assert "model" in checkpoint
    assert len(read_scalars(tmp_path / "runs")["losses/tv"]) >= 10
