# VACO with real asynchronous actors: CPU actor processes act with whatever weights they last loaded while the
# learner (main process) keeps updating, so every rollout arrives some learner versions old (policy lag).
# Paper: "Align and Filter: Improving Performance in Asynchronous On-Policy RL", arXiv 2603.01365.
# ALIGN re-estimates advantages of the learner's policy from lagged data with V-trace, once per batch;
# FILTER drops, per minibatch, the samples that would push the policy further out of a TV trust region.
import os
import random
import signal
import sys
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing import connection, forkserver
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp  # registers the reductions that pass shared tensors to other processes
import torch.nn as nn
import torch.optim as optim
from torch.distributions import Categorical
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter

try:  # registers the Atari ids (ALE/Breakout-v5, BreakoutNoFrameskip-v4) when ale-py is installed
    import ale_py

    gym.register_envs(ale_py)
except ImportError:
    ale_py = None

# Argument checks of torch.distributions cost more than the tiny networks here; our inputs are well-formed.
torch.distributions.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """experiment name, part of the run folder's name"""
    seed: int = 1
    """random seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """make cuDNN choose deterministic kernels"""
    cuda: bool = True
    """train on the GPU when one is available (the learner; actors always run on the CPU)"""
    track: bool = False
    """also log to Weights and Biases (imported only then)"""
    wandb_project_name: str = "vaco"
    """Weights and Biases project"""
    wandb_entity: str | None = None
    """Weights and Biases entity (user or team)"""
    capture_video: bool = False
    """whether to capture videos of the agent performances (first env of actor 0; check out `videos` folder)"""
    save_model: bool = False
    """whether to save the final model to `runs/{run_name}` (also on Ctrl-C / SIGTERM)"""
    eval_episodes: int = 10
    """with --save-model: episodes of greedy evaluation of the saved model after training (0 to skip)"""

    # rollouts and optimization
    env_id: str = "CartPole-v1"
    """the id of the environment (Discrete actions; vector observations, or Atari ids such as ALE/Breakout-v5)"""
    total_timesteps: int = 500000
    """total timesteps of the experiments (trained samples; rollouts dropped by --max-policy-lag come on top)"""
    learning_rate: float = 2.5e-4
    """Adam's learning rate (decayed linearly to 0 with --anneal-lr)"""
    num_actors: int = 2
    """the number of actor processes, each stepping its own vector env on CPU"""
    num_envs_per_actor: int = 2
    """the number of parallel game environments of each actor"""
    num_steps: int = 128
    """steps per environment in one rollout"""
    rollouts_per_batch: int = 2
    """the number of actor rollouts (num_envs_per_actor x num_steps samples each) in one learner batch"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the run"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """the lambda of GAE and of the V-trace traces"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """passes over each batch"""
    norm_adv: bool = True
    """standardize the advantages within each minibatch"""
    ent_coef: float = 0.01
    """weight of the entropy bonus"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """the global gradient norm is clipped to this"""

    # VACO
    policy_loss: Literal["vaco", "ppo", "spo"] = "vaco"
    """the policy loss: `vaco` (TV filter), or the `ppo` (clipped) and `spo` baselines"""
    tv_delta: float = 0.2
    """FILTER: trust-region bound on the sampled L1 distance mean|pi/beta - 1| (= 2 TV) of a minibatch"""
    realign: bool = True
    """ALIGN: recompute advantages with V-trace from the latest critic and policy (off: GAE on rollout values)"""
    rho_bar: float = 1.0
    """V-trace truncation of the importance weight rho"""
    c_bar: float = 1.0
    """V-trace truncation of the trace coefficient c"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient of `ppo`, and the penalty scale of `spo`"""

    # Asynchronous system arguments
    max_policy_lag: int | None = None
    """hard filter: drop rollouts more than this many learner versions old (off by default; VACO filters softly)"""
    max_actor_restarts: int = 3
    """restarts of failed actors allowed over the whole run; one more failure stops the run with its error"""
    wait_timeout: float = 120.0
    """seconds any wait (rollout, free slot, weights lock) may last before the run stops with an error"""

    # derived from the flags above
    batch_size: int = 0
    """samples per batch (set at start-up)"""
    minibatch_size: int = 0
    """samples per minibatch (set at start-up)"""
    num_iterations: int = 0
    """learner iterations of the run (set at start-up)"""


def check_args(args):
    """Stop with a one-line message, before any training, on input the run cannot use."""
    batch_size = args.rollouts_per_batch * args.num_envs_per_actor * args.num_steps
    problems = [
        (args.tv_delta <= 0, f"--tv-delta must be > 0 (got {args.tv_delta}); the paper uses 0.2"),
        (min(args.rho_bar, args.c_bar) <= 0, f"--rho-bar and --c-bar must be > 0 (got {args.rho_bar}, {args.c_bar})"),
        (args.rho_bar < args.c_bar,
         f"--rho-bar ({args.rho_bar}) must be >= --c-bar ({args.c_bar}), as V-trace requires"),
        (min(args.num_actors, args.num_envs_per_actor, args.rollouts_per_batch) < 1,
         "--num-actors, --num-envs-per-actor and --rollouts-per-batch must be >= 1"),
        (min(args.num_steps, args.num_minibatches, args.update_epochs) < 1,
         "--num-steps, --num-minibatches and --update-epochs must be >= 1"),
        (batch_size % max(args.num_minibatches, 1) != 0,
         f"the batch of --rollouts-per-batch x --num-envs-per-actor x --num-steps = {batch_size} samples does not "
         f"split into --num-minibatches {args.num_minibatches} equal minibatches; pick a divisor"),
        (args.total_timesteps < batch_size,
         f"--total-timesteps {args.total_timesteps} is less than one batch ({batch_size} steps)"),
        (args.policy_loss != "vaco" and args.clip_coef <= 0, f"--clip-coef must be > 0 (got {args.clip_coef})"),
        (args.max_policy_lag is not None and args.max_policy_lag < 0,
         f"--max-policy-lag must be >= 0 (got {args.max_policy_lag})"),
        (args.max_actor_restarts < 0, f"--max-actor-restarts must be >= 0 (got {args.max_actor_restarts})"),
        (args.wait_timeout <= 0, f"--wait-timeout must be > 0 seconds (got {args.wait_timeout})"),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")
    if args.capture_video:
        try:
            import moviepy  # noqa: F401  (gymnasium's RecordVideo writes the files with it)
        except ImportError:
            raise SystemExit("error: --capture-video needs moviepy: pip install moviepy")
    try:
        gym.spec(args.env_id)
    except gym.error.Error:
        hint = " (Atari ids need ale-py: pip install ale-py)" if ale_py is None else ""
        raise SystemExit(f"error: unknown --env-id {args.env_id!r}; try CartPole-v1 or ALE/Breakout-v5{hint}")


def is_atari(env_id):
    return "ale_py" in str(gym.spec(env_id).entry_point)


def make_env(env_id, idx, capture_video, run_name, gamma):
    def thunk():
        kwargs = {"frameskip": 1} if is_atari(env_id) else {}  # Atari: AtariPreprocessing skips the frames
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array", **kwargs)
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        else:
            env = gym.make(env_id, **kwargs)
        if is_atari(env_id):  # the usual Atari preprocessing: 84x84 gray frames, 4 skipped and 4 stacked
            env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
            env = gym.wrappers.RecordEpisodeStatistics(env)  # before reward clipping: it records the game score
            env = gym.wrappers.TransformReward(env, np.sign)
            env = gym.wrappers.FrameStackObservation(env, 4)
        else:
            env = gym.wrappers.RecordEpisodeStatistics(env)
        return env

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights of gain `std` and a constant bias, the usual initialization of PPO networks."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, observation_space, action_space):
        super().__init__()
        act_dim = int(action_space.n)
        self.images = len(observation_space.shape) == 3  # stacked frames: Nature-CNN trunk shared by both heads
        if self.images:
            self.trunk = nn.Sequential(
                layer_init(nn.Conv2d(observation_space.shape[0], 32, 8, stride=4)),
                nn.ReLU(),
                layer_init(nn.Conv2d(32, 64, 4, stride=2)),
                nn.ReLU(),
                layer_init(nn.Conv2d(64, 64, 3, stride=1)),
                nn.ReLU(),
                nn.Flatten(),
            )
            with torch.no_grad():
                n_flat = self.trunk(torch.zeros((1,) + observation_space.shape)).shape[1]
            self.trunk.append(layer_init(nn.Linear(n_flat, 512)))
            self.trunk.append(nn.ReLU())
            self.critic = layer_init(nn.Linear(512, 1), std=1.0)
            self.actor = layer_init(nn.Linear(512, act_dim), std=0.01)
            return
        obs_dim = int(np.prod(observation_space.shape))
        self.trunk = nn.Identity()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, act_dim), std=0.01),
        )

    def features(self, x):
        return self.trunk(x.float() / 255.0) if self.images else x  # frames travel as uint8

    def get_value(self, x):
        return self.critic(self.features(x)).squeeze(-1)

    def get_dist(self, x):
        return Categorical(logits=self.actor(self.features(x)))

    def get_action_and_value(self, x, action=None):
        hidden = self.features(x)
        dist = Categorical(logits=self.actor(hidden))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(hidden).squeeze(-1)


def compute_vtrace(rewards, values, bootstrap_value, dones, log_rhos, gamma, gae_lambda, rho_bar, c_bar):
    """ALIGN (spec section 2): V-trace advantages and value targets of the learner's policy from lagged data.

    Tensors are [T, N]; bootstrap_value [N] is V of the observation after the last step; dones[t] = the episode
    ended at step t; log_rhos = log pi_T(a|s) - log beta(a|s). With log_rhos = 0 this is GAE(lambda).
    """
    rhos = torch.exp(log_rhos)
    clipped_rhos = torch.clamp(rhos, max=rho_bar)
    cs = gae_lambda * torch.clamp(rhos, max=c_bar)
    not_dones = 1.0 - dones
    next_values = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
    deltas = rewards + gamma * not_dones * next_values - values
    advantages = torch.empty_like(values)
    vs_minus_v = torch.empty_like(values)
    acc = torch.zeros_like(bootstrap_value)  # acc[t + 1], zero past the last step
    for t in reversed(range(values.shape[0])):
        advantages[t] = deltas[t] + gamma * gae_lambda * not_dones[t] * acc
        acc = clipped_rhos[t] * deltas[t] + gamma * not_dones[t] * cs[t] * acc
        vs_minus_v[t] = acc
    return advantages, values + vs_minus_v


def policy_loss(kind, newlogprob, behavior_logprob, advantages, tv_delta, clip_coef):
    """FILTER (spec section 3) and the baselines (section 4) on one minibatch; the ratio is always pi_theta / beta.

    Returns (pg_loss, stats) with stats 'tv' = 0.5 mean|r - 1|, 'filtered_frac' (share of samples the filter
    dropped) and 'gate' (1.0 if mean|r - 1| > tv_delta).
    """
    ratio = torch.exp(newlogprob - behavior_logprob)
    with torch.no_grad():
        l1 = (ratio - 1).abs().mean()
        gate = l1 > tv_delta
    if kind == "vaco":
        # outside the trust region keep only the samples whose gradient step does not increase |r - 1|
        keep = torch.logical_or(~gate, advantages * (ratio.detach() - 1) <= 0)
        loss = -(keep * advantages * ratio).mean()  # dropped samples still count in the denominator
        filtered_frac = 1.0 - keep.float().mean().item()
    elif kind == "ppo":
        clipped_ratio = torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
        loss = torch.max(-advantages * ratio, -advantages * clipped_ratio).mean()
        filtered_frac = 0.0
    elif kind == "spo":
        loss = -(advantages * ratio - advantages.abs() / (2 * clip_coef) * (ratio - 1) ** 2).mean()
        filtered_frac = 0.0
    else:
        raise ValueError(f"unknown policy loss {kind!r}; expected 'vaco', 'ppo' or 'spo'")
    return loss, {"tv": 0.5 * l1.item(), "filtered_frac": filtered_frac, "gate": float(gate.item())}


def actor_main(actor_id, generation, args, run_name, weights, versions, lock, slots, free_slots, free_conn, full_conn):
    """An actor process: fill free slots with rollouts of the newest weights it has, report them to the learner."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the learner decides
    torch.set_num_threads(1)  # several actors share the cores; intra-op threads would only contend
    try:
        run_actor(actor_id, generation, args, run_name, weights, versions, lock, slots, free_slots, free_conn,
                  full_conn)
    except (EOFError, BrokenPipeError):  # the learner is gone: nobody to report to
        pass
    except BaseException:
        try:
            full_conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        sys.exit(1)


def run_actor(actor_id, generation, args, run_name, weights, versions, lock, slots, free_slots, free_conn, full_conn):
    seed = args.seed + 1000 * (actor_id + 1) + 100_000 * generation  # a restarted actor plays new episodes
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    n = args.num_envs_per_actor
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, actor_id * n + j, args.capture_video and generation == 0, run_name, args.gamma)
         for j in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    behavior = Agent(envs.single_observation_space, envs.single_action_space)
    local_weights, local_version = weights.clone(), -1
    obs_dtype = next(iter(slots.values()))["obs"].dtype
    next_obs, _ = envs.reset(seed=seed)
    envs.action_space.seed(seed)
    next_obs = torch.as_tensor(next_obs, dtype=obs_dtype)
    free = deque(free_slots)
    while True:
        wait_start = time.time()
        while not free:  # every slot of this actor waits in the learner's batch
            if free_conn.poll(1.0):
                free.append(free_conn.recv())  # EOFError when the learner is gone
            elif time.time() - wait_start > args.wait_timeout:
                raise TimeoutError(f"no free rollout slot for {args.wait_timeout} s: the learner seems stuck")
        if int(versions[actor_id]) != local_version:  # reload only when the learner published something new
            if not lock.acquire(timeout=args.wait_timeout):
                raise TimeoutError(f"the weights lock was held for {args.wait_timeout} s")
            try:  # under the lock: never a half-written set of weights
                local_weights.copy_(weights)
                local_version = int(versions[actor_id])
            finally:
                lock.release()
            vector_to_parameters(local_weights, behavior.parameters())
        actor_wait = time.time() - wait_start

        slot_id = free.popleft()
        slot = slots[slot_id]
        episodes = []
        for step in range(0, args.num_steps):
            slot["obs"][step] = next_obs
            with torch.no_grad():
                action, logprob, _, value = behavior.get_action_and_value(next_obs)
            slot["values"][step], slot["actions"][step], slot["logprobs"][step] = value, action, logprob

            next_obs, reward, terminations, truncations, infos = envs.step(action.numpy())
            slot["rewards"][step] = torch.as_tensor(reward, dtype=torch.float32)
            slot["dones"][step] = torch.as_tensor(terminations | truncations, dtype=torch.float32)
            next_obs = torch.as_tensor(next_obs, dtype=obs_dtype)
            if "final_obs" in infos:
                # time-limit truncation is not a real terminal: bootstrap the reward with the rollout critic
                truncated = np.flatnonzero(truncations & ~terminations)
                if len(truncated) > 0:
                    final_obs = torch.as_tensor(np.stack(infos["final_obs"][truncated]), dtype=obs_dtype)
                    with torch.no_grad():
                        slot["rewards"][step, truncated] += args.gamma * behavior.get_value(final_obs)
                finished = infos["final_info"].get("_episode", np.zeros(n, dtype=bool))
                for i in np.flatnonzero(finished):
                    episodes.append((float(infos["final_info"]["episode"]["r"][i]),
                                     int(infos["final_info"]["episode"]["l"][i])))
        slot["next_obs"][:] = next_obs
        with torch.no_grad():
            slot["next_values"][:] = behavior.get_value(next_obs)  # the behavior critic's bootstrap (--no-realign)
        full_conn.send(("rollout", {"slot": slot_id, "version": local_version, "episodes": episodes,
                                    "actor_wait_s": actor_wait}))


def start_process_server():
    # 'forkserver', not 'fork': the learner has run torch ops (thread pools, maybe CUDA) before the actors start
    # and restart, and forking such a process can deadlock or break CUDA. The server imports the heavy modules
    # once; every actor, restarts included, is a fork of that clean process and only re-runs this script's
    # definitions. ('spawn' also works but pays the imports, seconds, for every actor. The modules are named one
    # by one: Python 3.11's server silently skips a "__main__" preload and does not see this script's folder.)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.multiprocessing", "torch.utils.tensorboard", "gymnasium", "ale_py"])
    forkserver.ensure_running()  # early, so its imports overlap the learner's setup
    return ctx


class ActorPool:
    """The actor processes, the shared memory they write into, and the learner's side of every exchange.

    Each actor owns a few rollout slots (preallocated shared tensors) and two one-way pipes: the learner sends the
    ids of free slots on one, the actor answers with small messages naming the slot it filled on the other. So the
    free and full queues of an actor are bounded by its number of slots, and no big tensor is ever pickled. Per-actor
    pipes, weights buffers and locks keep a crash local: a killed actor can corrupt or block only its own channel,
    and the learner replaces all three when it restarts the actor.
    """

    def __init__(self, args, agent, observation_space, run_name, writer):
        self.ctx = start_process_server()  # already running: the main block started it earlier
        self.args, self.run_name, self.writer = args, run_name, writer
        A, n, T = args.num_actors, args.num_envs_per_actor, args.num_steps
        self.slots_per_actor = -(-args.rollouts_per_batch // A) + 1  # one more than its share of a batch
        obs_shape = observation_space.shape
        obs_dtype = torch.uint8 if observation_space.dtype == np.uint8 else torch.float32
        shapes = {"obs": ((T, n) + obs_shape, obs_dtype), "actions": ((T, n), torch.long),
                  "logprobs": ((T, n), torch.float32), "rewards": ((T, n), torch.float32),
                  "dones": ((T, n), torch.float32), "values": ((T, n), torch.float32),
                  "next_obs": ((n,) + obs_shape, obs_dtype), "next_values": ((n,), torch.float32)}
        self.slots = [{k: torch.zeros(shape, dtype=dtype).share_memory_() for k, (shape, dtype) in shapes.items()}
                      for _ in range(A * self.slots_per_actor)]
        self.version = 0  # learner updates published so far
        self.flat = parameters_to_vector(agent.parameters()).detach().cpu()
        self.weights = [self.flat.clone().share_memory_() for _ in range(A)]
        self.versions = torch.zeros(A, dtype=torch.int64).share_memory_()
        self.locks, self.procs, self.free_conns, self.full_conns = [None] * A, [None] * A, [None] * A, [None] * A
        self.generation, self.errors, self.held, self.ready, self.restarts = [0] * A, {}, set(), deque(), 0
        for i in range(A):
            self.start(i)

    def owned(self, i):
        return range(i * self.slots_per_actor, (i + 1) * self.slots_per_actor)

    def start(self, i):
        self.locks[i] = self.ctx.Lock()  # a fresh lock: a killed actor may have died holding the old one
        self.weights[i].copy_(self.flat)
        self.versions[i] = self.version
        free_recv, free_send = self.ctx.Pipe(duplex=False)
        full_recv, full_send = self.ctx.Pipe(duplex=False)
        free_slots = [s for s in self.owned(i) if s not in self.held]  # the others come back after the batch
        proc = self.ctx.Process(
            target=actor_main, name=f"actor-{i}", daemon=True,  # daemon: terminated if the learner exits abruptly
            args=(i, self.generation[i], self.args, self.run_name, self.weights[i], self.versions, self.locks[i],
                  {s: self.slots[s] for s in self.owned(i)}, free_slots, free_recv, full_send),
        )
        proc.start()
        free_recv.close()  # only the actor holds these ends now, so each side sees EOF when the other is gone
        full_send.close()
        self.procs[i], self.free_conns[i], self.full_conns[i] = proc, free_send, full_recv
        print(f"actor {i} started (pid {proc.pid})", flush=True)

    def publish(self, agent):
        """Copy the learner's parameters to every actor's buffer, each under that actor's lock."""
        self.version += 1
        self.flat.copy_(parameters_to_vector(agent.parameters()).detach())
        for i, lock in enumerate(self.locks):
            deadline = time.time() + self.args.wait_timeout
            while not lock.acquire(timeout=0.5):
                if not self.procs[i].is_alive():  # died holding it: next_rollout restarts it with a new lock
                    break
                if time.time() > deadline:
                    raise SystemExit(f"error: actor {i} held its weights lock for {self.args.wait_timeout} s")
            else:
                self.weights[i].copy_(self.flat)
                self.versions[i] = self.version
                lock.release()

    def free(self, slot_id):
        self.held.discard(slot_id)
        i = slot_id // self.slots_per_actor
        try:
            self.free_conns[i].send(slot_id)
        except OSError:  # the actor is dead: its restart hands every slot the learner does not hold to the new one
            pass

    def next_rollout(self):
        """The next filled rollout from any actor; restarts actors that died on the way."""
        deadline = time.time() + self.args.wait_timeout
        while not self.ready:
            if time.time() > deadline:
                raise SystemExit(f"error: no rollout arrived for {self.args.wait_timeout} s (--wait-timeout)")
            sentinels = [p.sentinel for p in self.procs]
            ready = connection.wait(self.full_conns + sentinels, timeout=1.0)
            for i in range(len(self.procs)):
                if self.full_conns[i] in ready or sentinels[i] in ready:
                    alive = self.receive(i)
                    if not alive or sentinels[i] in ready:
                        self.restart(i)
                        deadline = time.time() + self.args.wait_timeout
        return self.ready.popleft()

    def receive(self, i):
        """Read every pending message of actor i; False once its pipe is closed."""
        try:
            while self.full_conns[i].poll():
                kind, payload = self.full_conns[i].recv()
                if kind == "rollout":
                    self.held.add(payload["slot"])
                    self.ready.append(payload)
                else:
                    self.errors[i] = payload
            return True
        except (EOFError, OSError):
            return False

    def restart(self, i):
        proc = self.procs[i]
        proc.join(timeout=5)
        if proc.is_alive():  # closed its pipe yet still runs: a broken actor
            proc.kill()
            proc.join(timeout=5)
        code = proc.exitcode
        cause = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else \
            f"exited with code {code}"
        error = self.errors.pop(i, "").strip()
        message = f"actor {i} (pid {proc.pid}) failed: {cause}" + (f"\n{error}" if error else "")
        self.restarts += 1
        self.full_conns[i].close()
        self.free_conns[i].close()
        print(message, file=sys.stderr, flush=True)
        self.writer.add_text("actors/failures", message.replace("\n", "  \n"), self.restarts)
        if self.restarts > self.args.max_actor_restarts:
            raise SystemExit(f"error: stopping after {self.restarts} actor failures (--max-actor-restarts "
                             f"{self.args.max_actor_restarts} exhausted); the last one: {message}")
        self.generation[i] += 1
        self.start(i)

    def close(self):
        """Stop every actor; returns within a few seconds whatever state they are in."""
        alive = [p for p in self.procs if p is not None and p.is_alive()]
        for p in alive:
            p.terminate()
        for p in alive:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for conn in self.free_conns + self.full_conns:
            if conn is not None:
                conn.close()


def evaluate(model_path, args, run_name, device):
    """Greedy episodes (argmax action) of the saved model."""
    checkpoint = torch.load(model_path, map_location=device)
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, 0, args.capture_video, f"{run_name}-eval", args.gamma)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    agent = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    agent.load_state_dict(checkpoint["model"])
    obs, _ = envs.reset(seed=args.seed + 10_000)
    episodic_returns = []
    while len(episodic_returns) < args.eval_episodes:
        with torch.no_grad():
            action = agent.get_dist(torch.as_tensor(obs, device=device)).mode
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if "final_info" in infos and "episode" in infos["final_info"]:
            episodic_returns.append(float(infos["final_info"]["episode"]["r"][0]))
    envs.close()
    return episodic_returns


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    check_args(args)
    args.batch_size = int(args.rollouts_per_batch * args.num_envs_per_actor * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # the learner steps no env: one instance tells it the spaces the actors will see
    try:
        probe_env = make_env(args.env_id, 0, False, run_name, args.gamma)()
    except gym.error.DependencyNotInstalled as e:
        raise SystemExit(f"error: {args.env_id} needs a package that is not installed: {e}")
    observation_space, action_space = probe_env.observation_space, probe_env.action_space
    probe_env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        raise SystemExit(f"error: {args.env_id} has {action_space}; only Discrete actions work here "
                         "(continuous control: vaco_classic.py)")
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) in (1, 3)):
        raise SystemExit(f"error: {args.env_id} has {observation_space}; expected vectors or stacked frames")
    start_process_server()  # now, so that its imports overlap the learner's setup below

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}")
    flag_table = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
    writer.add_text("hyperparameters", f"|flag|value|\n|-|-|\n{flag_table}")

    agent = Agent(observation_space, action_space).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # rollout storage (the learner's copy of a batch: the rollouts side by side along the env axis)
    T, N, n = args.num_steps, args.rollouts_per_batch * args.num_envs_per_actor, args.num_envs_per_actor
    obs_dtype = torch.uint8 if observation_space.dtype == np.uint8 else torch.float32
    obs = torch.zeros((T, N) + observation_space.shape, dtype=obs_dtype).to(device)
    actions = torch.zeros((T, N), dtype=torch.long).to(device)
    logprobs = torch.zeros((T, N)).to(device)  # behavior log-probs, log beta(a|s)
    rewards = torch.zeros((T, N)).to(device)
    dones = torch.zeros((T, N)).to(device)  # dones[t]: the episode ended at step t
    values = torch.zeros((T, N)).to(device)  # behavior critic at rollout time
    next_obs = torch.zeros((N,) + observation_space.shape, dtype=obs_dtype).to(device)  # obs after the last step
    next_values = torch.zeros(N).to(device)  # behavior critic's value of next_obs

    # start
    global_step = 0
    start_time = time.time()
    recent_returns = deque(maxlen=20)
    lag_counts = Counter()
    model_path = f"runs/{run_name}/{args.exp_name}.pt"
    stop_requested = False

    def request_stop(signum, frame):
        """Ctrl-C or SIGTERM: finish the current iteration, then save and close the logs; a second Ctrl-C aborts."""
        global stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    actors = None

    try:
        actors = ActorPool(args, agent, observation_space, run_name, writer)
        for iteration in range(1, args.num_iterations + 1):
            if stop_requested:
                print(f"interrupted at step {global_step}; closing the logs{' and saving the model' * args.save_model}")
                break
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            # gather a batch; rollouts older than --max-policy-lag learner versions are dropped (the hard filter)
            batch, dropped, wait_start = [], 0, time.time()
            while len(batch) < args.rollouts_per_batch:
                rollout = actors.next_rollout()
                global_step += T * n
                for episodic_return, episodic_length in rollout["episodes"]:
                    recent_returns.append(episodic_return)
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", episodic_length, global_step)
                if args.max_policy_lag is not None and actors.version - rollout["version"] > args.max_policy_lag:
                    actors.free(rollout["slot"])
                    dropped += 1
                else:
                    batch.append(rollout)
            learner_wait = time.time() - wait_start
            # copy the batch out of shared memory and hand the slots back at once: actors refill them meanwhile
            for j, rollout in enumerate(batch):
                slot, cols = actors.slots[rollout["slot"]], slice(j * n, (j + 1) * n)
                for buffer, key in [(obs, "obs"), (actions, "actions"), (logprobs, "logprobs"),
                                    (rewards, "rewards"), (dones, "dones"), (values, "values")]:
                    buffer[:, cols] = slot[key]
                next_obs[cols], next_values[cols] = slot["next_obs"], slot["next_values"]
                actors.free(rollout["slot"])
            lags = [actors.version - rollout["version"] for rollout in batch]
            lag_counts.update(lags)

            # ALIGN: once per batch, with the latest critic and the learner snapshot pi_T
            with torch.no_grad():
                flat_obs, flat_actions = obs.reshape((T * N,) + obs.shape[2:]), actions.flatten(0, 1)
                _, learner_logprob, _, learner_value = agent.get_action_and_value(flat_obs, flat_actions)
                log_rhos = learner_logprob.view(T, N) - logprobs
                if args.realign:
                    target_values = learner_value.view(T, N)
                    advantages, returns = compute_vtrace(
                        rewards, target_values, agent.get_value(next_obs), dones, log_rhos,
                        args.gamma, args.gae_lambda, args.rho_bar, args.c_bar,
                    )
                else:  # naive asynchronous PPO: GAE over the values the behavior network produced
                    target_values = values
                    advantages, returns = compute_vtrace(
                        rewards, values, next_values, dones, torch.zeros_like(log_rhos),
                        args.gamma, args.gae_lambda, args.rho_bar, args.c_bar,
                    )
                rhos = log_rhos.exp()
                align_stats = {
                    "align/tv_behavior": 0.5 * (rhos - 1).abs().mean().item(),
                    "align/rho_mean": rhos.mean().item(),
                    "align/rho_clipped_frac": (rhos > args.rho_bar).float().mean().item(),
                }

            # flatten the batch
            b_obs, b_actions, b_logprobs = flat_obs, flat_actions, logprobs.reshape(-1)
            b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), target_values.reshape(-1)

            # FILTER: optimize the policy and value network, every minibatch against the behavior log-probs
            minibatch_stats = []
            for epoch in range(args.update_epochs):
                b_inds = torch.randperm(args.batch_size, device=device)
                for start in range(0, args.batch_size, args.minibatch_size):
                    mb_inds = b_inds[start : start + args.minibatch_size]
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                    mb_advantages = b_advantages[mb_inds]
                    if args.norm_adv:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                    pg_loss, pg_stats = policy_loss(args.policy_loss, newlogprob, b_logprobs[mb_inds], mb_advantages,
                                                    args.tv_delta, args.clip_coef)
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()
                    entropy_loss = entropy.mean()
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()

                    with torch.no_grad():  # http://joschu.net/blog/kl-approx.html, against the behavior policy
                        logratio = newlogprob - b_logprobs[mb_inds]
                        ratio = logratio.exp()
                        minibatch_stats.append({
                            "losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                            "losses/entropy": entropy_loss.item(), "losses/old_approx_kl": (-logratio).mean().item(),
                            "losses/approx_kl": ((ratio - 1) - logratio).mean().item(),
                            "losses/clipfrac": ((ratio - 1.0).abs() > args.clip_coef).float().mean().item(),
                            "losses/tv": pg_stats["tv"], "losses/filtered_frac": pg_stats["filtered_frac"],
                            "losses/filter_gate_frac": pg_stats["gate"],
                        })
            actors.publish(agent)

            # share of the value targets' variance that the critic explains (1: perfect, <= 0: useless)
            target_var = b_returns.var().item()
            explained_var = np.nan if target_var == 0 else 1 - (b_returns - b_values).var().item() / target_var

            # log the iteration
            logged = {key: np.mean([stats[key] for stats in minibatch_stats]) for key in minibatch_stats[0]}
            logged.update(align_stats)
            logged.update({"losses/explained_variance": explained_var, "charts/policy_lag": np.mean(lags),
                           "charts/learning_rate": optimizer.param_groups[0]["lr"],
                           "charts/SPS": int(global_step / (time.time() - start_time))})
            logged.update({"charts/policy_lag_max": max(lags), "charts/dropped_rollouts": dropped,
                           "charts/actor_restarts": actors.restarts, "perf/learner_wait_s": learner_wait,
                           "perf/actor_wait_s": np.mean([rollout["actor_wait_s"] for rollout in batch])})
            for key, value in logged.items():
                writer.add_scalar(key, value, global_step)
            if iteration % 10 == 0 or iteration == args.num_iterations:
                recent = f"{np.mean(recent_returns):8.2f}" if recent_returns else "     n/a"
                print(f"step {global_step:>9} | return {recent} | SPS {logged['charts/SPS']:>6} | "
                      f"tv {logged['losses/tv']:.3f} | filtered {logged['losses/filtered_frac']:.3f} | "
                      f"lag {logged['charts/policy_lag']:.2f} | waits learner {learner_wait:.3f}s "
                      f"actor {logged['perf/actor_wait_s']:.3f}s", flush=True)
    finally:  # also on errors: no actor outlives the learner
        if actors is not None:
            actors.close()
        writer.flush()
    print(f"policy lag of the trained rollouts (versions: count): {dict(sorted(lag_counts.items()))}")

    if args.save_model:
        torch.save({"model": agent.state_dict(), "args": vars(args)}, model_path)
        print(f"model saved to {model_path}")
        if args.eval_episodes > 0 and not stop_requested:
            episodic_returns = evaluate(model_path, args, run_name, device)
            for idx, episodic_return in enumerate(episodic_returns):
                writer.add_scalar("eval/episodic_return", episodic_return, idx)
            print(f"eval: mean return {np.mean(episodic_returns):.2f} over {len(episodic_returns)} greedy episodes")

    writer.close()
    if stop_requested:
        sys.exit(130)
