"""Helpers shared by the test files: run a script as a user would, and read back what it logged."""

import copy
import importlib
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts import as modules: vaco_classic, vaco_atari, ...
# README, "What is logged": what every script with a critic writes to TensorBoard
SPEC_KEYS = {
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/learning_rate",
    "charts/SPS",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "losses/tv",
    "losses/filtered_frac",
    "losses/filter_gate_frac",
    "align/tv_behavior",
    "align/rho_mean",
    "align/rho_clipped_frac",
    "charts/policy_lag",
    "charts/kl_coef",
    "charts/tv_delta",
}


def script_env(env=None):
    """The environment of a script's process: one thread (two cores thrash otherwise), unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


def run_script(script, *args, cwd, timeout=600, env=None):
    """Run `python ROOT/script args...` in `cwd` to its end; returns the CompletedProcess (stdout, stderr apart)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_script(script, *args, cwd, env=None, **popen_kwargs):
    """Start `python ROOT/script args...` in `cwd` and return the Popen at once (stderr merged into stdout, text)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env=script_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen_kwargs,
    )


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


def run_main(script, *flags, cwd, monkeypatch):
    """Run `script` as __main__ inside this process, in `cwd`, so that a test can patch what it calls and look at
    what it leaves; returns (the SystemExit it raised or None, its globals or None). The signal handlers and torch's
    thread count it sets are put back."""
    import torch

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, flags)])
    handlers, num_threads = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)), torch.get_num_threads()
    try:
        return None, runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        return e, None
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        torch.set_num_threads(num_threads)


def record_updates(monkeypatch, names, first_names=()):
    """Watch every gradient step of a training loop: each call of torch.nn.utils.clip_grad_norm_ (after backward,
    before the optimizer step, so the parameters are still those the step started from) appends to the returned
    list a copy of the caller's variables `names`, and of `first_names` too on the first step of an iteration
    (epoch 0, start 0), where the model is still the learner's snapshot pi_T. Tensors and modules are copied, so
    later in-place writes of the loop do not change what was recorded."""
    import torch

    records, clip = [], torch.nn.utils.clip_grad_norm_

    def snapshot(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: snapshot(v) for k, v in value.items()}
        return copy.deepcopy(value)

    def recording_clip(*args, **kwargs):
        frame = sys._getframe(1).f_locals
        first = frame.get("epoch") == 0 and frame.get("start") == 0
        records.append({name: snapshot(frame[name]) for name in [*names, *(first_names if first else ())]})
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    return records


def record_env_steps(monkeypatch, vector_env_class):
    """Every step of every `vector_env_class` (same-step autoreset): the rewards, terminations, truncations and
    final observations the loop received, in order."""
    steps, step = [], vector_env_class.step

    def recording_step(self, actions):
        result = step(self, actions)
        _, reward, terminations, truncations, infos = result
        final_obs = [None if o is None else np.array(o) for o in infos.get("final_obs", [None] * len(reward))]
        steps.append((np.array(reward), np.array(terminations), np.array(truncations), final_obs))
        return result

    monkeypatch.setattr(vector_env_class, "step", recording_step)
    return steps


@pytest.fixture
def run(tmp_path):
    """run(script, *args) -> CompletedProcess, executed in this test's own temporary folder."""
    return lambda script, *args, **kwargs: run_script(script, *args, cwd=tmp_path, **kwargs)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: a learning run, a real multi-process run, Atari or the benchmark runner; "
        "`pytest -m 'not slow'` skips them for a fast loop (CI runs everything)",
    )
