"""Helpers shared by the test files: run a script as a user would, and read back what it logged."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts import as modules: vaco_classic, vaco_atari, ...
# README, "What is logged": what every script with a critic writes to TensorBoard
SPEC_KEYS = {
    "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
    "losses/clipfrac", "losses/explained_variance", "losses/tv", "losses/filtered_frac", "losses/filter_gate_frac",
    "align/tv_behavior", "align/rho_mean", "align/rho_clipped_frac", "charts/policy_lag",
}


def script_env(env=None):
    """The environment of a script's process: one thread (two cores thrash otherwise), unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


def run_script(script, *args, cwd, timeout=600, env=None):
    """Run `python ROOT/script args...` in `cwd` to its end; returns the CompletedProcess (stdout, stderr apart)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout)


def start_script(script, *args, cwd, env=None, **popen_kwargs):
    """Start `python ROOT/script args...` in `cwd` and return the Popen at once (stderr merged into stdout, text)."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=script_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen_kwargs)


def read_scalars(folder):
    """{tag: [(step, value), ...]} from the one TensorBoard run found under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(Path(folder).rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, f"expected one event file under {folder}, found {event_files}"
    accumulator = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def values(scalars, key):
    """The values logged under `key`, in step order, as an array."""
    return np.array([value for _, value in scalars[key]])


def flag_error(script, *flags):
    """The message with which `script`'s check_args refuses `flags`, checked to be one line starting 'error: '.

    In-process (no Python start-up per case); a few end-to-end cases per script check that the same line reaches
    stderr before anything is created."""
    import tyro

    module = importlib.import_module(Path(script).stem)
    with pytest.raises(SystemExit) as stop:
        module.check_args(tyro.cli(module.Args, args=[str(flag) for flag in flags]))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def run(tmp_path):
    """run(script, *args) -> CompletedProcess, executed in this test's own temporary folder."""
    return lambda script, *args, **kwargs: run_script(script, *args, cwd=tmp_path, **kwargs)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a learning run, a real multi-process run or Atari; "
                                       "`pytest -m 'not slow'` skips them for a fast loop (CI runs everything)")
