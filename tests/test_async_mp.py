"""vaco_async_mp.py: its arguments, and the asynchronous system run as a user runs it (subprocesses)."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SPEC_KEYS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "vaco_async_mp.py"
sys.path.insert(0, str(ROOT))
import vaco_async_mp  # noqa: E402

# a small fast-learning CartPole configuration shared by the runs below
SMALL = ["--num-steps", "64", "--learning-rate", "2.5e-3", "--eval-episodes", "0"]


# ---------------------------------------------------------------- arguments (spec functions: test_spec_functions.py)


@pytest.mark.parametrize("flags,message", [
    (dict(num_actors=0), "--num-actors"),
    (dict(rollouts_per_batch=3, num_envs_per_actor=1, num_steps=10, num_minibatches=4), "does not split"),
    (dict(max_policy_lag=-1), "--max-policy-lag must be >= 0"),
    (dict(max_actor_restarts=-2), "--max-actor-restarts must be >= 0"),
    (dict(wait_timeout=0.0), "--wait-timeout must be > 0"),
    (dict(env_id="NoSuchEnv-v9"), "unknown --env-id"),
])
def test_bad_arguments_stop_with_a_clear_message(flags, message):
    with pytest.raises(SystemExit, match=message):
        vaco_async_mp.check_args(vaco_async_mp.Args(**flags))


def test_the_cnn_is_chosen_by_the_observation_shape():
    frames = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    agent = vaco_async_mp.Agent(frames, gym.spaces.Discrete(6))
    assert agent.images
    action, logprob, entropy, value = agent.get_action_and_value(torch.zeros((3, 4, 84, 84), dtype=torch.uint8))
    assert action.shape == logprob.shape == entropy.shape == value.shape == (3,)
    assert not vaco_async_mp.Agent(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2)).images


# ---------------------------------------------------------------- helpers for the runs


def child_env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path))
    env.pop("PYTHONWARNINGS", None)
    return env


def run(tmp_path, *flags, timeout=120):
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=tmp_path, env=child_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    return proc


class Running:
    """The script in the background, its stdout and stderr collected line by line."""

    def __init__(self, tmp_path, *flags):
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=tmp_path, env=child_env(tmp_path),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)  # its own process group, as a shell job has
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")))
        self.reader.start()

    def wait_for(self, predicate, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [line for line in list(self.lines) if predicate(line)]
            if found:
                return found
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError("expected output did not come; output:\n" + "".join(self.lines))

    def finish(self, timeout):
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
            self.reader.join(timeout=5)
        return code, "".join(self.lines)


def descendants(pid):
    """Pids of all processes below pid, read from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def is_running(pid):
    """True if pid exists and is not a zombie (an exited child that nobody reaped yet)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def assert_all_gone(pids, within=5.0):
    deadline = time.time() + within
    while time.time() < deadline and any(is_running(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if is_running(p)], "processes left behind"


def scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (tmp_path / "runs").rglob("events.out.tfevents.*")  # ALE/Pong-v5 runs nest one level deeper
    run_dir = event_file.parent
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {key: [e.value for e in acc.Scalars(key)] for key in acc.Tags()["scalars"]}


def actor_pids(lines):
    return [int(line.rsplit("pid ", 1)[1].rstrip(")\n")) for line in lines if " started (pid " in line]


# ---------------------------------------------------------------- runs

DOCUMENTED_KEYS = sorted(SPEC_KEYS | {"charts/policy_lag_max", "charts/dropped_rollouts", "charts/actor_restarts",
                                      "perf/learner_wait_s", "perf/actor_wait_s"})


def test_two_actors_learn_cartpole_log_every_key_and_leave_no_process(tmp_path):
    run_ = Running(tmp_path, "--num-actors", "2", "--total-timesteps", "25600", "--seed", "1", *SMALL)
    pids = set(actor_pids(run_.wait_for(lambda line: " started (pid " in line)))
    pids |= descendants(run_.proc.pid)  # the actors, the process server that forks them, the resource tracker
    code, output = run_.finish(timeout=120)
    assert code == 0, output
    assert_all_gone(pids | {run_.proc.pid})
    logged = scalars(tmp_path)
    assert not [key for key in DOCUMENTED_KEYS if key not in logged], f"keys missing; logged: {sorted(logged)}"
    returns = logged["charts/episodic_return"]
    best_mean_20 = max(np.mean(returns[i - 20 : i]) for i in range(20, len(returns) + 1))
    assert best_mean_20 >= 195, f"CartPole did not reach a mean return of 195 over 20 episodes: {best_mean_20:.1f}"
    assert max(logged["charts/policy_lag"]) <= max(logged["charts/policy_lag_max"])
    assert logged["charts/actor_restarts"][-1] == 0


def test_lag_is_real_and_the_hard_filter_drops_old_rollouts(tmp_path):
    """Four actors on two cores with tiny rollouts queue up faster than the learner trains: lag > 0 is measured."""
    proc = run(tmp_path, "--num-actors", "4", "--num-envs-per-actor", "1", "--num-steps", "16",
               "--rollouts-per-batch", "2", "--num-minibatches", "2", "--max-policy-lag", "1",
               "--total-timesteps", "1600", "--eval-episodes", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = scalars(tmp_path)
    assert max(logged["charts/policy_lag"]) > 0
    assert max(logged["charts/policy_lag_max"]) == 1  # never above --max-policy-lag
    assert sum(logged["charts/dropped_rollouts"]) > 0
    assert len(logged["charts/policy_lag"]) == 1600 // 32


def test_an_actor_killed_mid_run_is_restarted_and_training_finishes(tmp_path):
    run_ = Running(tmp_path, "--num-actors", "2", "--total-timesteps", "6400", "--num-steps", "32",
                   "--eval-episodes", "0")
    victim = actor_pids(run_.wait_for(lambda line: "actor 1 started" in line))[0]
    run_.wait_for(lambda line: line.startswith("step"))  # training is under way
    os.kill(victim, signal.SIGKILL)
    run_.wait_for(lambda line: "failed: killed by signal SIGKILL" in line)
    code, output = run_.finish(timeout=120)
    assert code == 0, output
    assert f"actor 1 (pid {victim}) failed: killed by signal SIGKILL" in output
    assert len(actor_pids(output.splitlines())) == 3  # two at the start, one restart
    logged = scalars(tmp_path)
    assert logged["charts/actor_restarts"][-1] == 1
    assert len(logged["charts/policy_lag"]) == 6400 // 128  # every iteration ran


# imported at startup by every Python process of the run (PYTHONPATH=tmp_path), actors included
CRASHING_ENV = '''
import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv


class BrokenCartPole(CartPoleEnv):
    def step(self, action):
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken > 40:
            raise RuntimeError("the test env broke on purpose")
        return super().step(action)


gym.register("BrokenCartPole-v0", entry_point=BrokenCartPole, max_episode_steps=500)
'''


def test_past_the_restart_limit_the_run_stops_with_the_actor_error(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(CRASHING_ENV))
    start = time.time()
    proc = run(tmp_path, "--env-id", "BrokenCartPole-v0", "--max-actor-restarts", "2",
               "--total-timesteps", "5120", "--eval-episodes", "0", timeout=90)
    assert proc.returncode != 0
    assert "RuntimeError: the test env broke on purpose" in proc.stderr  # the actor's traceback, in the learner
    assert "stopping after 3 actor failures (--max-actor-restarts 2 exhausted)" in proc.stderr
    assert proc.stderr.count("failed: exited with code 1") >= 3
    assert time.time() - start < 60


@pytest.mark.parametrize("sig,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_a_checkpoint_and_stops_everything(tmp_path, sig, to_group):
    """Ctrl-C in a terminal signals the whole process group; `kill` or a scheduler signals the learner only."""
    run_ = Running(tmp_path, "--num-actors", "2", "--total-timesteps", "10000000", "--save-model", *SMALL)
    run_.wait_for(lambda line: line.startswith("step"))
    pids = descendants(run_.proc.pid)
    assert len(pids) >= 3  # two actors and the process server at least
    sent = time.time()
    if to_group:
        os.killpg(run_.proc.pid, sig)
    else:
        run_.proc.send_signal(sig)
    code, output = run_.finish(timeout=10)
    assert code == 130, output
    assert time.time() - sent < 5
    assert_all_gone(pids)
    (model_path,) = (tmp_path / "runs").glob("*/vaco_async_mp.pt")
    checkpoint = torch.load(model_path)
    env = gym.make("CartPole-v1")
    agent = vaco_async_mp.Agent(env.observation_space, env.action_space)
    agent.load_state_dict(checkpoint["model"])
    assert checkpoint["args"]["num_actors"] == 2
    assert agent.get_value(torch.zeros(1, 4)).shape == (1,)


def test_atari_runs_with_the_cnn(tmp_path):
    pytest.importorskip("ale_py", reason="Atari needs ale-py (pip install ale-py)")
    proc = run(tmp_path, "--env-id", "ALE/Pong-v5", "--num-actors", "1", "--num-envs-per-actor", "1",
               "--num-steps", "16", "--rollouts-per-batch", "2", "--num-minibatches", "2", "--update-epochs", "1",
               "--total-timesteps", "64", "--eval-episodes", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = scalars(tmp_path)
    assert len(logged["charts/policy_lag"]) == 2 and len(logged["losses/tv"]) == 2
