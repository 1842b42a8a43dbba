"""What a user meets when the input or the run goes wrong, in every script with a critic: a non-finite float flag
and a diverged run each stop with one line (no traceback), and vaco_classic.py names the script an Atari id needs."""

import dataclasses
import importlib
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, flag_error, read_scalars, values

SCRIPTS = ["vaco_classic.py", "vaco_atari.py", "vaco_async_mp.py"]


def float_flags(script):
    """Every float field of the script's Args, as its flag: a float flag added later is covered without a change."""
    fields = dataclasses.fields(importlib.import_module(script[: -len(".py")]).Args)
    return [f"--{field.name.replace('_', '-')}" for field in fields if field.type in (float, "float")]


FLOAT_CASES = [(script, flag, value) for script in SCRIPTS for flag in float_flags(script) for value in ("inf", "-inf", "nan")]


def test_the_float_flags_are_found():
    """The table below is generated: make sure it holds what it should, so that it cannot pass empty."""
    for script in SCRIPTS:
        assert {"--learning-rate", "--ent-coef", "--gamma", "--max-grad-norm", "--tv-delta"} <= set(float_flags(script))
    assert "--wait-timeout" in float_flags("vaco_async_mp.py") and "--seed" not in float_flags("vaco_classic.py")


@pytest.mark.parametrize("script,flag,value", FLOAT_CASES, ids=[" ".join(case) for case in FLOAT_CASES])
def test_a_non_finite_float_flag_is_refused_by_name(script, flag, value):
    assert flag_error(script, f"{flag}={value}") == f"error: {flag} must be a finite number (got {value})"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_finite_flag_on_the_command_line_is_one_line_on_stderr(run, tmp_path, script):
    result = run(script, "--ent-coef", "inf", timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: --ent-coef must be a finite number (got inf)"], result.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# a diverged run: an absurd learning rate on a tiny budget. One optimizer step per iteration (--update-epochs 1
# --num-minibatches 1) lets several of these cases pass a first iteration before they blow up, so that the log has
# something to keep. Measured at seed 1: the iteration each case stops at and what it names.

TINY = {
    "vaco_classic.py": ["--num-envs", 2, "--num-steps", 64, "--total-timesteps", 640],
    "vaco_atari.py": ["--num-envs", 1, "--num-steps", 64, "--total-timesteps", 320],
    "vaco_async_mp.py": ["--num-actors", 2, "--num-envs-per-actor", 1, "--num-steps", 64, "--total-timesteps", 640],
}
BATCH = {"vaco_classic.py": 128, "vaco_atari.py": 64, "vaco_async_mp.py": 128}  # samples per iteration of TINY
ONE_STEP = ["--update-epochs", 1, "--num-minibatches", 1]
DIVERGING = [
    # script, flags, the iteration it stops at and the quantity it names (the same in the async script whatever the
    # actors' timing: one step at such a learning rate breaks the network whatever the batch)
    ("vaco_classic.py", ["--learning-rate", "1e20", *ONE_STEP], 2, "losses/value_loss"),
    ("vaco_classic.py", ["--env-id", "Pendulum-v1", "--learning-rate", 30, *ONE_STEP], 3, "losses/policy_loss"),
    # one step makes std = exp(logstd) overflow: the next rollout would sample from a policy of infinite std
    ("vaco_classic.py", ["--env-id", "Pendulum-v1", "--learning-rate", 100, *ONE_STEP], 1, "log-prob at the next"),
    ("vaco_classic.py", ["--env-id", "Pendulum-v1", "--learning-rate", "1e8"], 1, "losses/policy_loss"),  # 4x4 steps
    ("vaco_atari.py", ["--learning-rate", 1000, *ONE_STEP], 2, "losses/value_loss"),
    # finite weights whose CNN overflows on the next frames: the sampler of the next rollout would raise
    ("vaco_atari.py", ["--learning-rate", "1e6", *ONE_STEP], 1, "log-prob at the next"),
    ("vaco_async_mp.py", ["--learning-rate", "1e20", *ONE_STEP], 2, "losses/value_loss"),
    ("vaco_async_mp.py", ["--env-id", "Pendulum-v1", "--learning-rate", 1000, *ONE_STEP], 1, "log-prob at the next"),
]
MESSAGE = re.compile(
    r"error: diverged at step (\d+) \(iteration (\d+)\): (\S.*) is (-?inf|nan); "
    r"try a lower --learning-rate \((\S+)\) or --max-grad-norm \(0\.5\)"
)


@pytest.mark.parametrize(
    "script,flags,stop,quantity",
    [  # the Atari and multi-process cases are slow
        pytest.param(
            *case,
            marks=[pytest.mark.slow] if case[0] != "vaco_classic.py" else [],
            id=f"{case[0]} {' '.join(map(str, case[1]))}",
        )
        for case in DIVERGING
    ],
)
def test_a_diverged_run_stops_with_one_line_keeps_its_log_and_saves_no_model(run, tmp_path, script, flags, stop, quantity):
    result = run(script, *TINY[script], *flags, "--save-model", timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    match = MESSAGE.fullmatch(result.stderr.splitlines()[-1])
    assert match, result.stderr
    step, iteration, named, _, learning_rate = match.groups()
    assert float(learning_rate) == float(flags[flags.index("--learning-rate") + 1])
    iteration, batch = int(iteration), BATCH[script]
    assert iteration == stop and named.startswith(quantity), result.stderr
    assert int(step) == iteration * batch
    # the iterations before the diverged one are in the log, each finite; the diverged one is not logged
    scalars = read_scalars(tmp_path / "runs")
    logged = values(scalars, "losses/policy_loss") if iteration > 1 else []
    assert len(logged) == iteration - 1 and all(abs(value) < float("inf") for value in logged)
    assert [step for step, _ in scalars.get("losses/policy_loss", [])] == [i * batch for i in range(1, iteration)]
    assert not list((tmp_path / "runs").rglob("*.pt")), "a diverged model must not be saved"
    assert "model saved" not in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# an Atari id given to vaco_classic.py

# In a fresh interpreter, as a run starts: importing ale_py registers the Atari ids for the whole process, and the
# test session has imported it already (vaco_atari.py does at import). check_args imports it on the first Atari id
# it meets, so only the first id of a process is an Atari id; the others must keep gymnasium's message with ale_py
# imported as well.
ATARI_PROBE = """
import json, sys, gymnasium as gym, tyro
sys.path.insert(0, {root!r})
import vaco_classic

class NeedsAMissingPackage(gym.Env):
    def __init__(self):
        raise gym.error.DependencyNotInstalled("a package this task needs is missing")

gym.register("NeedsAMissingPackage-v0", entry_point=NeedsAMissingPackage)
messages = {{}}
for env_id in sys.argv[1:]:
    try:
        vaco_classic.check_args(tyro.cli(vaco_classic.Args, args=["--env-id", env_id]))
    except SystemExit as stop:
        messages[env_id] = str(stop.code)
print(json.dumps(messages))
"""


def test_an_atari_id_names_the_scripts_that_take_it():
    ids = ["PongNoFrameskip-v4", "NoSuchEnv-v0", "NeedsAMissingPackage-v0"]  # ALE/Pong-v5: the next test
    result = subprocess.run(
        [sys.executable, "-c", ATARI_PROBE.format(root=str(ROOT)), *ids], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stdout)
    assert messages["PongNoFrameskip-v4"] == (
        "error: --env-id PongNoFrameskip-v4: Atari games run with vaco_atari.py (or vaco_async_mp.py)"
    )
    # an unknown id, and a known one whose package is missing, keep gymnasium's own message
    assert messages["NoSuchEnv-v0"] == "error: --env-id NoSuchEnv-v0: Environment `NoSuchEnv` doesn't exist."
    assert messages["NeedsAMissingPackage-v0"] == (
        "error: --env-id NeedsAMissingPackage-v0: a package this task needs is missing"
    )


def test_an_atari_id_on_the_command_line_is_one_line_on_stderr(run, tmp_path):
    result = run("vaco_classic.py", "--env-id", "ALE/Pong-v5", timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: --env-id ALE/Pong-v5: Atari games run with vaco_atari.py (or vaco_async_mp.py)"
    ], result.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# configurations that no run can start from: refused before anything is created, naming the flag and why


SYNCHRONOUS = ["vaco_classic.py", "vaco_atari.py"]  # vaco_async_mp.py's batch has other flags: tests/test_async_mp.py
UNSTARTABLE = [
    # --norm-adv divides each minibatch's advantages by their standard deviation, undefined for one sample
    (["--num-envs", "2", "--num-steps", "8", "--num-minibatches", "16"], "--num-minibatches must be <= 8 with --norm-adv"),
    # Adam's first step is lr / (1 - 0.9): above 0.1 x float32's largest value torch cannot represent it
    (["--learning-rate", "1e38"], "--learning-rate must be < 3.4e+37, or Adam's first step overflows float32 (got 1e+38)"),
    # torch.clamp takes its bound as a float32 (V-trace's rho_bar, impala's weight, ppo's clip)
    (["--rho-bar", "3.5e38"], "--rho-bar must be <= 3.4e+38, a float32 clamp bound (got 3.5e+38)"),
    # a batch of one sample: the explained variance (and every std) is undefined
    (["--num-envs", "1", "--num-steps", "1", "--num-minibatches", "1"], "--num-steps must be >= 2 with --num-envs 1"),
]


@pytest.mark.parametrize("script", SYNCHRONOUS)
@pytest.mark.parametrize(
    "flags,message", UNSTARTABLE, ids=["minibatch-of-one", "adam-overflow", "clamp-overflow", "batch-of-one"]
)
def test_a_configuration_that_cannot_run_is_refused_naming_the_flag(script, flags, message):
    assert flag_error(script, *flags).startswith(f"error: {message}")


@pytest.mark.parametrize("script", SYNCHRONOUS)
def test_the_limits_of_the_refusals_still_run(script):
    """Just inside each limit check_args lets the run start: the refusals are no wider than they must be."""
    import tyro

    module = importlib.import_module(script[: -len(".py")])
    inside = [
        ["--num-envs", "2", "--num-steps", "8", "--num-minibatches", "8"],
        ["--learning-rate", "3e37"],
        ["--rho-bar", "3e38"],
    ]
    inside += [["--num-envs", "1", "--num-steps", "2", "--num-minibatches", "1"]]
    for flags in inside:
        module.check_args(tyro.cli(module.Args, args=flags))  # raises SystemExit if refused
    module.check_args(
        tyro.cli(module.Args, args=["--num-envs", "2", "--num-steps", "8", "--num-minibatches", "16", "--no-norm-adv"])
    )
