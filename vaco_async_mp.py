# VACO with real asynchronous actors, from "Align and Filter: Improving Performance in Asynchronous On-Policy RL"
# (arXiv 2603.01365). --num-actors CPU processes step their own envs with whatever weights they last loaded while the
# learner (the main process) trains, so every rollout arrives some learner versions old: the policy lag, measured.
# The learner runs ALIGN (V-trace advantages of its own policy from the lagged data, once per batch) and FILTER (per
# minibatch, drop the samples that would push the policy further out of a TV trust region), then publishes its
# weights. Top to bottom: the flags, make_env and Agent, the VACO functions, an actor (collect_rollout, actor_main),
# the learner's side of the exchange (ActorPool), the learner (train), the flag checks, and the main block.
import contextlib
import importlib.util
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, deque, namedtuple
from dataclasses import dataclass
from multiprocessing import connection, forkserver
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp  # registers the reductions that pass shared tensors to other processes
import torch.nn as nn
import torch.optim as optim
from gymnasium.wrappers.utils import RunningMeanStd
from torch.distributions import Categorical, Normal
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter

try:  # registers the Atari ids (ALE/Breakout-v5, BreakoutNoFrameskip-v4) when ale-py is installed
    import ale_py

    gym.register_envs(ale_py)
except ImportError:
    pass  # no Atari ids then

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
    """record videos of the first environment of actor 0 to `videos/{run_name}` (needs moviepy)"""
    save_model: bool = False
    """save the final model to `runs/{run_name}` (also on Ctrl-C / SIGTERM); this script does not evaluate it"""

    # rollouts and optimization
    env_id: str = "CartPole-v1"
    """the id of the environment (vector observations with Discrete or Box actions, or an Atari id)"""
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
    policy_loss: Literal["vaco", "ppo", "spo", "ppo-kl", "impala"] = "vaco"
    """`vaco` (TV filter), or a baseline: `ppo` (clipped), `spo`, `ppo-kl` (KL penalty), `impala` (V-trace policy gradient)"""
    tv_delta: float = 0.2
    """FILTER: trust-region bound on the sampled L1 distance mean|pi/beta - 1| (= 2 TV) of a minibatch"""
    tv_delta_rule: Literal["fixed", "forward"] = "fixed"
    """`forward` (ours, not the paper's): the bound is --tv-delta + the batch's lag mean|pi_T/beta - 1|, every batch"""
    realign: bool = True
    """ALIGN: recompute advantages with V-trace from the latest critic and policy (off: GAE on rollout values)"""
    rho_bar: float = 1.0
    """V-trace truncation of the importance weight rho"""
    c_bar: float = 1.0
    """V-trace truncation of the trace coefficient c"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient of `ppo`, and the penalty scale of `spo`"""
    kl_coef: float = 0.1
    """`ppo-kl`: weight of the KL penalty (its starting value with --kl-target)"""
    kl_target: float = 0.0
    """`ppo-kl`: > 0 adapts --kl-coef once per iteration, x2 if the mean KL > 1.5 target, /2 if < target / 1.5"""

    # Asynchronous system arguments
    max_policy_lag: int | None = None
    """hard filter: drop rollouts more than this many learner versions old (off by default; VACO filters softly)"""
    max_actor_restarts: int = 3
    """restarts of failed actors allowed over the whole run; one more failure stops the run with its error"""
    wait_timeout: float = 120.0
    """seconds any wait (rollout, free slot, weights lock) may last before the run stops with an error"""


class EpisodicLife(gym.Wrapper):
    """A life loss ends the training episode, not the game: reset() then takes one no-op step and the game goes on."""

    def __init__(self, env):
        super().__init__(env)
        self.lives, self.game_over = 0, True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        terminated = terminated or 0 < lives < self.lives
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        game_over = self.game_over or kwargs.get("seed") is not None  # a seed asks for a fresh game
        if not game_over:
            obs, _, terminated, truncated, info = self.env.step(0)
            game_over = terminated or truncated
        if game_over:
            obs, info = self.env.reset(**kwargs)
        self.lives, self.game_over = self.env.unwrapped.ale.lives(), False
        return obs, info


class FireReset(gym.Wrapper):
    """After every reset (under EpisodicLife, every life loss too) press FIRE, then action 2: Breakout waits for it."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info


def is_atari(env_id):
    return "ale_py" in str(gym.spec(env_id).entry_point)


def make_env(env_id, idx, capture_video, run_name):
    """Atari ids get vaco_atari.py's preprocessing, so that a score means the same in both scripts. Vector
    observations and rewards stay raw: the learner owns their normalization (README: "Normalization under lag")."""

    def thunk():
        atari = is_atari(env_id)
        # AtariPreprocessing skips the frames, not the id; the sticky actions of ALE/...-v5 ids stay on
        ale_kwargs = dict(frameskip=1, obs_type="grayscale") if atari else {}
        env = gym.make(env_id, render_mode="rgb_array" if capture_video and idx == 0 else None, **ale_kwargs)
        if capture_video and idx == 0:
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        env = gym.wrappers.RecordEpisodeStatistics(env)  # under all of the preprocessing: the score of a whole game
        if atari:
            # 1 to 30 no-ops on reset, 4 frames per action (max of the last two), 84x84 grayscale; lives: EpisodicLife
            env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
            env = EpisodicLife(env)
            if env.unwrapped.get_action_meanings()[1] == "FIRE":  # FIRE is action 1 in every game that has it
                env = FireReset(env)
            env = gym.wrappers.TransformReward(env, lambda reward: float(np.sign(reward)))
            env = gym.wrappers.FrameStackObservation(env, stack_size=4)
        elif isinstance(env.action_space, gym.spaces.Box):  # continuous control: as vaco_classic.py
            env = gym.wrappers.ClipAction(env)
        return env

    return thunk


# Orthogonal weights of gain `std` and a constant bias, the usual initialization of PPO networks.
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


# CleanRL's PPO network: two hidden layers of 64 tanh units.
def mlp(in_features, out_features, out_std):
    return nn.Sequential(
        layer_init(nn.Linear(in_features, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, out_features), std=out_std),
    )


class Agent(nn.Module):
    """Vectors: separate tanh MLPs for the actor and the critic, as vaco_classic.py. Atari frames: the Nature CNN
    trunk shared by both heads, as vaco_atari.py. Box actions: a Gaussian with a state-independent log std."""

    def __init__(self, observation_space, action_space):
        super().__init__()
        self.images = len(observation_space.shape) == 3
        self.continuous = isinstance(action_space, gym.spaces.Box)
        act_dim = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        if self.images:
            self.trunk = nn.Sequential(
                layer_init(nn.Conv2d(4, 32, 8, stride=4)),
                nn.ReLU(),
                layer_init(nn.Conv2d(32, 64, 4, stride=2)),
                nn.ReLU(),
                layer_init(nn.Conv2d(64, 64, 3, stride=1)),
                nn.ReLU(),
                nn.Flatten(),
                layer_init(nn.Linear(64 * 7 * 7, 512)),
                nn.ReLU(),
            )
            self.actor = layer_init(nn.Linear(512, act_dim), std=0.01)
            self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        else:
            self.actor = mlp(observation_space.shape[0], act_dim, out_std=0.01)  # a near-uniform first policy
            self.critic = mlp(observation_space.shape[0], 1, out_std=1.0)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))
            # the observation statistics are part of the policy: parameters that no gradient reaches, so that the
            # learner publishes them with the weights and an actor acts with those of the weights it holds
            self.obs_mean = nn.Parameter(torch.zeros(observation_space.shape), requires_grad=False)
            self.obs_var = nn.Parameter(torch.ones(observation_space.shape), requires_grad=False)

    def features(self, x):
        """What the heads see: frames scaled to [0, 1]; with Box actions, the observations normalized with this
        policy's statistics and clipped to [-10, 10], as gymnasium's NormalizeObservation and vaco_classic.py do."""
        x = x.float()
        if self.images:
            return self.trunk(x / 255.0)
        if self.continuous:
            return ((x - self.obs_mean) / torch.sqrt(self.obs_var + 1e-8)).clamp(-10, 10)
        return x

    def get_value(self, x):
        return self.critic(self.features(x)).squeeze(-1)

    def get_action_and_value(self, x, action=None):
        hidden = self.features(x)
        out = self.actor(hidden)
        dist = Normal(out, self.actor_logstd.expand_as(out).exp()) if self.continuous else Categorical(logits=out)
        action = dist.sample() if action is None else action
        logprob, entropy = dist.log_prob(action), dist.entropy()
        if self.continuous:  # independent action dimensions
            logprob, entropy = logprob.sum(-1), entropy.sum(-1)
        return action, logprob, entropy, self.critic(hidden).squeeze(-1)


def compute_vtrace(rewards, values, bootstrap_value, dones, log_rhos, gamma, gae_lambda, rho_bar, c_bar):
    """ALIGN (README: "The algorithm"): V-trace advantages and value targets of the learner's policy from lagged data.

    Tensors are [T, N]; bootstrap_value [N] is V of the observation after the last step; dones[t] = the episode
    ended at step t; log_rhos = log pi_T(a|s) - log beta(a|s). With log_rhos = 0 this is GAE(lambda).
    """
    clipped_rhos = torch.clamp(log_rhos.exp(), max=rho_bar)
    cs = gae_lambda * torch.clamp(log_rhos.exp(), max=c_bar)
    not_dones = 1.0 - dones
    next_values = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
    deltas = rewards + gamma * not_dones * next_values - values
    advantages, vs_minus_v = torch.empty_like(values), torch.empty_like(values)  # vs_minus_v[t] = v_t - V(s_t)
    next_vs_minus_v = torch.zeros_like(bootstrap_value)  # v_{t+1} - V(s_{t+1}), zero past the last step
    for t in reversed(range(values.shape[0])):
        advantages[t] = deltas[t] + gamma * gae_lambda * not_dones[t] * next_vs_minus_v
        vs_minus_v[t] = clipped_rhos[t] * deltas[t] + gamma * not_dones[t] * cs[t] * next_vs_minus_v
        next_vs_minus_v = vs_minus_v[t]
    return advantages, values + vs_minus_v


def policy_loss(kind, newlogprob, behavior_logprob, advantages, tv_delta, clip_coef, kl_coef, rho_bar=1.0):
    """FILTER and the baseline losses (README: "The algorithm") on one minibatch, with the ratio
    r = exp(newlogprob - behavior_logprob): pi_theta / beta, or pi_theta / pi_T when the caller anchors at pi_T.

    Returns (pg_loss, stats) with stats 'tv' = 0.5 mean|r - 1|, 'filtered_frac' (share of samples the filter
    dropped) and 'gate' (1.0 if mean|r - 1| > tv_delta).
    """
    logratio = newlogprob - behavior_logprob
    ratio = torch.exp(logratio)
    with torch.no_grad():
        l1 = (ratio - 1).abs().mean()
        gate = l1 > tv_delta
    keep = torch.ones_like(ratio, dtype=torch.bool)  # only the vaco filter drops samples
    if kind == "vaco":
        # outside the trust region keep only the samples whose gradient step does not increase |r - 1|
        keep = ~gate | (advantages * (ratio.detach() - 1) <= 0)
        loss = -(keep * advantages * ratio).mean()  # dropped samples still count in the denominator
    elif kind == "ppo":
        loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()
    elif kind == "spo":
        loss = -(advantages * ratio - advantages.abs() / (2 * clip_coef) * (ratio - 1) ** 2).mean()
    elif kind == "ppo-kl":
        # (r - 1) - log r >= 0 has expectation KL(beta || pi_theta) under the behavior policy's samples
        loss = -(advantages * ratio).mean() + kl_coef * ((ratio - 1) - logratio).mean()
    elif kind == "impala":
        # IMPALA's policy gradient: the truncated importance weight min(rho_bar, r) is a constant, not differentiated
        truncated_ratio = torch.clamp(ratio.detach(), max=rho_bar)
        loss = -(truncated_ratio * advantages * logratio).mean()
    else:
        raise ValueError(f"unknown policy loss {kind!r}; expected 'vaco', 'ppo', 'spo', 'ppo-kl' or 'impala'")
    return loss, {"tv": 0.5 * l1.item(), "filtered_frac": 1.0 - keep.float().mean().item(), "gate": float(gate.item())}


def adapt_kl_coef(kl_coef, kl, kl_target):
    """PPO's adaptive KL penalty, once per iteration: double the coefficient if the iteration's mean KL exceeded
    1.5 kl_target, halve it if the KL stayed under kl_target / 1.5; kl_target = 0 keeps it fixed."""
    if kl_target > 0 and kl > 1.5 * kl_target:
        return kl_coef * 2
    if kl_target > 0 and kl < kl_target / 1.5:
        return kl_coef / 2
    return kl_coef


def adapt_tv_delta(tv_delta, anchor_rhos, rule):
    # The bound that policy_loss gets, once per batch (ours, not the paper's; README: "Choosing delta"). `fixed` keeps
    # tv_delta. `forward` adds the batch's backward lag mean|pi_T/anchor - 1|: as E|pi_theta/beta - pi_T/beta| is
    # 2 TV(pi_theta, pi_T), the gate then stays open (in expectation) while this batch's own move is under tv_delta.
    # It equals `fixed` without lag (up to rounding) and for the learner anchor (anchor = pi_T). Off by default:
    # under lag the bound follows the lag and the lag the bound, so the lag can compound.
    return tv_delta + (anchor_rhos - 1).abs().mean().item() if rule == "forward" else tv_delta


def rollout_buffers(T, n, observation_space, action_space):
    """Zeroed [time, env] tensors for T steps of n envs: an actor's rollout slot, or the learner's batch (n = all of
    its envs). obs and values have one more row: the observation after the last step, and its value."""
    obs_dtype = torch.uint8 if observation_space.dtype == np.uint8 else torch.float32
    action_dtype = torch.float32 if isinstance(action_space, gym.spaces.Box) else torch.long
    return {
        "obs": torch.zeros((T + 1, n) + observation_space.shape, dtype=obs_dtype),  # raw observations
        "actions": torch.zeros((T, n) + action_space.shape, dtype=action_dtype),
        "logprobs": torch.zeros(T, n),  # behavior log-probs, log beta(a|s)
        "rewards": torch.zeros(T, n),  # raw rewards
        "dones": torch.zeros(T, n),  # dones[t]: the episode ended at step t
        "values": torch.zeros(T + 1, n),  # behavior critic at rollout time
        "truncation_values": torch.zeros(T, n),  # behavior critic's V(final obs) where a time limit cut the episode
        "discounted_rewards": torch.zeros(T, n),  # gymnasium NormalizeReward's running discounted sum of rewards
    }


@torch.no_grad()
def collect_rollout(args, behavior, envs, next_obs, discounted, slot):
    """Fill `slot` with num_steps steps of every env, acting with `behavior` (so with its observation statistics) on
    the raw observations; `discounted` (per env) is updated in place. Returns the next observation and the episodes."""
    episodes = []
    for step in range(args.num_steps):
        slot["obs"][step] = torch.as_tensor(next_obs)
        action, logprob, _, value = behavior.get_action_and_value(slot["obs"][step])
        slot["actions"][step], slot["logprobs"][step], slot["values"][step] = action, logprob, value

        next_obs, reward, terminations, truncations, infos = envs.step(action.numpy())
        discounted *= args.gamma * (1 - terminations)
        discounted += reward
        slot["rewards"][step] = torch.as_tensor(reward)
        slot["discounted_rewards"][step] = torch.as_tensor(discounted)
        slot["dones"][step] = torch.as_tensor(terminations | truncations)
        slot["truncation_values"][step] = 0.0
        truncated = np.flatnonzero(truncations & ~terminations)
        if len(truncated) > 0:  # a time limit is not a real terminal: the learner bootstraps with this critic value
            final_obs = torch.as_tensor(np.stack(infos["final_obs"][truncated]))
            slot["truncation_values"][step, truncated] = behavior.get_value(final_obs)
        ended = infos.get("final_info", {})  # the statistics of the episodes that ended at this step
        for i in np.flatnonzero(ended.get("_episode", [])):
            episodes.append((float(ended["episode"]["r"][i]), int(ended["episode"]["l"][i])))
    slot["obs"][args.num_steps] = torch.as_tensor(next_obs)
    slot["values"][args.num_steps] = behavior.get_value(slot["obs"][args.num_steps])
    return next_obs, episodes


# What one actor process gets: its shared weights buffer, their version and the lock that guards both, its rollout
# slots (free_slots: the ids of those it may fill now), and its ends of the two pipes to the learner.
ActorLink = namedtuple("ActorLink", "index generation weights version lock slots free_slots free_conn full_conn")


def actor_main(args, run_name, link):
    """An actor process: fill free slots with rollouts of the newest weights it has, report them to the learner.
    An error ends it with its traceback on the run's stderr and exit code 1; the learner restarts it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the learner decides
    torch.set_num_threads(1)  # several actors share the cores; intra-op threads would only contend
    seed = args.seed + 1000 * (link.index + 1) + 100_000 * link.generation  # a restarted actor plays new episodes
    torch.manual_seed(seed)  # the actions' sampling; the envs are seeded by reset
    n = args.num_envs_per_actor
    video = args.capture_video and link.generation == 0  # a restarted actor 0 records no more videos
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, link.index * n + j, video, run_name) for j in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    behavior = Agent(envs.single_observation_space, envs.single_action_space)
    local_version = -1
    next_obs, _ = envs.reset(seed=seed)
    discounted = np.zeros(n)
    free = deque(link.free_slots)
    with contextlib.suppress(EOFError, BrokenPipeError):  # the learner is gone: nobody to report to
        while True:
            wait_start = time.time()
            if not free:  # every slot of this actor waits in the learner's batch
                if not link.free_conn.poll(args.wait_timeout):
                    raise TimeoutError(f"no free rollout slot for {args.wait_timeout} s: the learner seems stuck")
                free.append(link.free_conn.recv())  # EOFError when the learner is gone
            if int(link.version) != local_version:  # reload only when the learner published something new
                if not link.lock.acquire(timeout=args.wait_timeout):
                    raise TimeoutError(f"the weights lock was held for {args.wait_timeout} s")
                # a copy under the lock: never a half-written set of weights (the parameters become views of it)
                vector_to_parameters(link.weights.clone(), behavior.parameters())
                local_version = int(link.version)
                link.lock.release()
            actor_wait = time.time() - wait_start
            slot_id = free.popleft()
            next_obs, episodes = collect_rollout(args, behavior, envs, next_obs, discounted, link.slots[slot_id])
            link.full_conn.send({"slot": slot_id, "version": local_version, "episodes": episodes, "actor_wait_s": actor_wait})


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
    """The actor processes, the shared memory they write into, and the learner's side of every exchange. Each actor
    owns a few rollout slots (shared tensors) and two one-way pipes: the learner sends the ids of free slots on one,
    the actor answers on the other with small messages naming the slot it filled, so no big tensor is ever pickled.
    Per-actor pipes, weights and locks keep a crash local: a killed actor can block only its own, and the learner
    replaces all three when it restarts the actor."""

    def __init__(self, args, agent, observation_space, action_space, run_name, writer):
        self.ctx = start_process_server()  # already running: the main block started it earlier
        self.args = args
        self.run_name = run_name
        self.writer = writer
        # an actor's share of a batch, + 1 to fill while the learner trains. When the learner is the bottleneck, a
        # rollout waits in its slot for the batches ahead of it (perf/actor_wait_s grows): with the defaults, 2
        # slots, it arrives 2 versions old. When the actors are the bottleneck, perf/learner_wait_s grows.
        self.slots_per_actor = math.ceil(args.rollouts_per_batch / args.num_actors) + 1
        self.slots = []
        for _ in range(args.num_actors * self.slots_per_actor):  # in shared memory: the actors write, the learner reads
            slot = rollout_buffers(args.num_steps, args.num_envs_per_actor, observation_space, action_space)
            self.slots.append({key: buffer.share_memory_() for key, buffer in slot.items()})
        self.version = 0  # learner updates published so far
        self.flat = parameters_to_vector(agent.parameters()).detach().cpu()
        # per actor: its link, its process, and the learner's ends of its two pipes
        self.links = [None] * args.num_actors
        self.procs = [None] * args.num_actors
        self.free_conns = [None] * args.num_actors
        self.full_conns = [None] * args.num_actors
        self.ready = deque()  # messages of filled slots that the learner has not taken yet
        self.restarts = 0  # actor failures so far
        for i in range(args.num_actors):
            self.start(i, generation=0)

    def start(self, i, generation):
        free_recv, free_send = self.ctx.Pipe(duplex=False)
        full_recv, full_send = self.ctx.Pipe(duplex=False)
        owned = range(i * self.slots_per_actor, (i + 1) * self.slots_per_actor)
        waiting = {message["slot"] for message in self.ready}  # filled before a restart; handed back once trained
        self.links[i] = ActorLink(
            index=i,
            generation=generation,
            weights=self.flat.clone().share_memory_(),
            version=torch.tensor(self.version).share_memory_(),
            free_conn=free_recv,
            full_conn=full_send,
            lock=self.ctx.Lock(),  # a fresh one: a killed actor may have died holding the old one
            free_slots=[slot for slot in owned if slot not in waiting],
            slots={s: self.slots[s] for s in owned},
        )
        actor_args = (self.args, self.run_name, self.links[i])
        # daemon: terminated if the learner exits abruptly
        proc = self.ctx.Process(target=actor_main, name=f"actor-{i}", args=actor_args, daemon=True)
        proc.start()
        free_recv.close()  # only the actor holds these ends now, so each side sees EOF when the other is gone
        full_send.close()
        self.procs[i], self.free_conns[i], self.full_conns[i] = proc, free_send, full_recv
        print(f"actor {i} started (pid {proc.pid})", flush=True)

    def publish(self, agent):
        """Copy the learner's policy (weights and observation statistics) to every actor's buffer under its lock."""
        self.version += 1
        self.flat.copy_(parameters_to_vector(agent.parameters()).detach())
        for link in self.links:
            # a second at most: an actor holds its lock only to copy the weights; one that died holding it gets a
            # fresh lock when it is restarted, one that is stuck gets the next version
            if link.lock.acquire(timeout=1.0):
                link.weights.copy_(self.flat)
                link.version.fill_(self.version)
                link.lock.release()

    def free(self, slot_id):
        with contextlib.suppress(OSError):  # a dead actor: its restart hands every slot not waiting in `ready` over
            self.free_conns[slot_id // self.slots_per_actor].send(slot_id)

    def next_rollout(self):
        """The next filled rollout from any actor; restarts actors that died on the way."""
        deadline = time.time() + self.args.wait_timeout
        while not self.ready:
            if time.time() > deadline:
                raise SystemExit(f"error: no rollout arrived for {self.args.wait_timeout} s (--wait-timeout)")
            ready = connection.wait(self.full_conns + [proc.sentinel for proc in self.procs], timeout=1.0)
            for i, proc in enumerate(self.procs):
                failed = proc.sentinel in ready  # it exited: first take what it sent before
                try:
                    while self.full_conns[i].poll():
                        self.ready.append(self.full_conns[i].recv())
                except (EOFError, OSError):  # its pipe is closed: it is gone
                    failed = True
                if failed:
                    self.restart(i)
                    deadline = time.time() + self.args.wait_timeout
        return self.ready.popleft()

    def restart(self, i):
        proc = self.procs[i]
        proc.join(timeout=5)
        proc.kill()  # if it closed its pipe yet still runs: a broken actor
        proc.join(timeout=5)
        code = proc.exitcode
        cause = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        message = f"actor {i} (pid {proc.pid}) failed: {cause}"
        self.restarts += 1
        print(message, file=sys.stderr, flush=True)
        self.writer.add_text("actors/failures", message, self.restarts)
        if self.restarts > self.args.max_actor_restarts:
            raise SystemExit(
                f"error: stopping after {self.restarts} actor failures (--max-actor-restarts "
                f"{self.args.max_actor_restarts} exhausted); the last one: {message}"
            )
        self.start(i, generation=self.links[i].generation + 1)

    def close(self):
        """Stop every actor at once, whatever state it is in (they hold nothing that needs saving)."""
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.join(timeout=5)


def train(args, agent, optimizer, actors, batch, writer, stop):
    """The learner: gather a batch of rollouts, update the normalization statistics, ALIGN once, FILTER in every
    minibatch, publish, log, until the last iteration or `stop` (a threading.Event) is set. Returns the lag counts."""
    T = args.num_steps
    n = args.num_envs_per_actor  # the envs of one rollout
    N = batch["rewards"].shape[1]  # the envs of a batch: its rollouts side by side
    batch_size = T * N
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size
    obs_rms = RunningMeanStd(shape=batch["obs"].shape[2:])
    reward_rms = RunningMeanStd(shape=())
    global_step = 0
    start_time = time.time()
    recent_returns = deque(maxlen=20)  # the last episodic returns, for the progress line
    lag_counts = Counter()
    for iteration in range(1, num_iterations + 1):
        if stop.is_set():
            print(f"interrupted at step {global_step}")
            break
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        # gather a batch, each rollout copied out of shared memory and its slot handed back at once (the actor
        # refills it meanwhile); rollouts older than --max-policy-lag learner versions are dropped (the hard filter)
        rollouts = []
        dropped = 0
        wait_start = time.time()
        while len(rollouts) < args.rollouts_per_batch:
            rollout = actors.next_rollout()
            global_step += T * n
            for episodic_return, episodic_length in rollout["episodes"]:
                recent_returns.append(episodic_return)
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)
            # the lag: learner versions published since the weights the rollout was collected with. This batch is
            # trained by version iteration - 1, so charts/behavior_version = iteration - 1 - charts/policy_lag.
            rollout["lag"] = actors.version - rollout["version"]
            if args.max_policy_lag is not None and rollout["lag"] > args.max_policy_lag:
                dropped += 1
            else:
                column = len(rollouts) * n
                for key, buffer in actors.slots[rollout["slot"]].items():
                    batch[key][:, column : column + n] = buffer
                rollouts.append(rollout)
            actors.free(rollout["slot"])
        learner_wait = time.time() - wait_start
        lags = [rollout["lag"] for rollout in rollouts]
        lag_counts.update(lags)

        # Box actions: the learner owns the normalization statistics. It updates them from this batch's raw data (the
        # actors send raw observations and rewards, with each env's running discounted sum of rewards), uses them from
        # here on, and publishes them with the weights; an actor normalizes with those of the weights it holds. So a
        # change of the statistics is part of the lag that ALIGN and FILTER see: at lag 0 too, pi_T / beta differs
        # from 1 by what the last batch changed in them. Rewards are scaled as gymnasium's NormalizeReward does, then
        # clipped to [-10, 10], as vaco_classic.py does.
        rewards = batch["rewards"]
        if agent.continuous:
            obs_rms.update(batch["obs"][:T].flatten(0, 1).cpu().numpy())
            reward_rms.update(batch["discounted_rewards"].flatten().cpu().numpy())
            agent.obs_mean.copy_(torch.as_tensor(obs_rms.mean))
            agent.obs_var.copy_(torch.as_tensor(obs_rms.var))
            rewards = (rewards / float(np.sqrt(reward_rms.var + 1e-8))).clamp(-10, 10)
        # a time limit is not a real terminal: bootstrapped, after the scaling, with the value the actor's critic gave
        rewards = rewards + args.gamma * batch["truncation_values"]

        # ALIGN: once per batch, the advantages of the learner snapshot pi_T with the latest critic, on raw observations
        with torch.no_grad():
            b_obs = batch["obs"][:T].flatten(0, 1)
            b_actions = batch["actions"].flatten(0, 1)
            b_logprobs = batch["logprobs"].flatten()
            _, b_learner_logprobs, _, b_learner_values = agent.get_action_and_value(b_obs, b_actions)
            b_rhos = (b_learner_logprobs - b_logprobs).exp()  # pi_T / beta
            if args.realign:  # V-trace with pi_T's log-probs and the latest critic
                log_rhos = (b_learner_logprobs - b_logprobs).view(T, N)
                b_values = b_learner_values
                bootstrap_value = agent.get_value(batch["obs"][T])
            else:  # naive asynchronous PPO: GAE (rho = 1) over the values the behavior network gave at rollout time
                log_rhos = torch.zeros_like(rewards)
                b_values = batch["values"][:T].flatten()
                bootstrap_value = batch["values"][T]
            advantages, returns = compute_vtrace(
                rewards=rewards,
                values=b_values.view(T, N),
                bootstrap_value=bootstrap_value,
                dones=batch["dones"],
                log_rhos=log_rhos,
                gamma=args.gamma,
                gae_lambda=args.gae_lambda,
                rho_bar=args.rho_bar,
                c_bar=args.c_bar,
            )
            b_advantages, b_returns = advantages.flatten(), returns.flatten()
            tv_delta = adapt_tv_delta(args.tv_delta, b_rhos, args.tv_delta_rule)
            loss_coefs = dict(tv_delta=tv_delta, clip_coef=args.clip_coef, kl_coef=args.kl_coef, rho_bar=args.rho_bar)

        # FILTER: optimize the policy and value network, every minibatch against the behavior log-probs
        minibatch_stats = []
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(batch_size, device=b_obs.device)
            for start in range(0, batch_size, minibatch_size):
                mb_inds = b_inds[start : start + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                pg_loss, pg_stats = policy_loss(args.policy_loss, newlogprob, b_logprobs[mb_inds], mb_advantages, **loss_coefs)
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
                    minibatch_stats.append(
                        {
                            "losses/policy_loss": pg_loss.item(),
                            "losses/value_loss": v_loss.item(),
                            "losses/entropy": entropy_loss.item(),
                            "losses/old_approx_kl": (-logratio).mean().item(),
                            "losses/approx_kl": ((ratio - 1) - logratio).mean().item(),
                            "losses/clipfrac": ((ratio - 1.0).abs() > args.clip_coef).float().mean().item(),
                            "losses/tv": pg_stats["tv"],  # what the gate compared with tv_delta (halved)
                            "losses/filtered_frac": pg_stats["filtered_frac"],
                            "losses/filter_gate_frac": pg_stats["gate"],
                        }
                    )

        # share of the value targets' variance that the critic explains (1: perfect, <= 0: useless)
        returns_var = b_returns.var().item()
        explained_var = np.nan if returns_var == 0 else 1 - (b_returns - b_values).var().item() / returns_var

        # log the iteration: the mean over its minibatches of each loss statistic
        logged = {key: np.mean([stats[key] for stats in minibatch_stats]) for key in minibatch_stats[0]}
        # a diverged update stops the run before the next rollout samples from it: a loss statistic, a parameter, or
        # the log-prob where the next rollout starts (finite but huge weights can overflow there) is not finite
        with torch.no_grad():
            watched = {f"parameter {name}": param for name, param in agent.named_parameters()}
            watched["log-prob at the next observations"] = agent.get_action_and_value(batch["obs"][T], batch["actions"][-1])[1]
        not_finite = [f"{key} is {value}" for key, value in logged.items() if not np.isfinite(value)]
        for name, tensor in watched.items():
            if not tensor.isfinite().all():
                first_non_finite = tensor[~tensor.isfinite()][0].item()
                not_finite.append(f"{name} is {first_non_finite}")
        if not_finite:
            writer.close()  # the iterations before it stay readable; no model is saved, so none is overwritten
            raise SystemExit(
                f"error: diverged at step {global_step} (iteration {iteration}): {not_finite[0]}; try a lower "
                f"--learning-rate ({args.learning_rate:g}) or --max-grad-norm ({args.max_grad_norm:g})"
            )
        actors.publish(agent)
        logged.update(
            {
                "losses/explained_variance": explained_var,
                "charts/policy_lag": np.mean(lags),
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "align/rho_mean": b_rhos.mean().item(),
                "charts/SPS": int(global_step / (time.time() - start_time)),
                "charts/kl_coef": args.kl_coef,
                "align/tv_behavior": 0.5 * (b_rhos - 1).abs().mean().item(),
                "charts/tv_delta": tv_delta,
                "align/rho_clipped_frac": (b_rhos > args.rho_bar).float().mean().item(),
                "charts/policy_lag_max": max(lags),
                "charts/behavior_version": np.mean([rollout["version"] for rollout in rollouts]),
                "charts/dropped_rollouts": dropped,
                "charts/actor_restarts": actors.restarts,
                "perf/learner_wait_s": learner_wait,
                "perf/actor_wait_s": np.mean([rollout["actor_wait_s"] for rollout in rollouts]),
            }
        )
        for key, value in logged.items():
            writer.add_scalar(key, value, global_step)
        args.kl_coef = adapt_kl_coef(args.kl_coef, logged["losses/approx_kl"], args.kl_target)
        if iteration % 10 == 0 or iteration == num_iterations:
            recent = f"{np.mean(recent_returns):8.2f}" if recent_returns else "     n/a"
            print(
                f"step {global_step:>9} | return {recent} | SPS {logged['charts/SPS']:>6} | "
                f"tv {logged['losses/tv']:.3f} | filtered {logged['losses/filtered_frac']:.3f} | "
                f"lag {logged['charts/policy_lag']:.2f}",
                flush=True,
            )
    return lag_counts


# Stop with one line naming the flag, its value and its valid range, before anything is created; returns the
# observation and action spaces of the environment.
def check_args(args):
    given = {name.replace("_", "-"): value for name, value in vars(args).items()}  # flag -> its value
    batch = args.rollouts_per_batch * args.num_envs_per_actor * args.num_steps  # samples per learner batch
    counts = "num-actors num-envs-per-actor num-steps rollouts-per-batch update-epochs"
    equal_minibatches = args.num_minibatches >= 1 and batch % args.num_minibatches == 0  # that cover the batch
    two_per_minibatch = batch >= 2 * args.num_minibatches  # each minibatch normalizes its advantages by their std
    float32_max = torch.finfo(torch.float32).max
    adam_fits = args.learning_rate / (1 - 0.9) <= float32_max  # Adam's first step, as torch computes it
    rules = [(f, np.isfinite(value), "a finite number") for f, value in given.items() if isinstance(value, float)]
    rules += [(f, given[f] >= 1, ">= 1") for f in counts.split()]
    rules += [(f, 0 <= given[f] <= 1, "in [0, 1]") for f in ("gamma", "gae-lambda")]
    rules += [(f, given[f] > 0, "> 0") for f in "learning-rate max-grad-norm tv-delta rho-bar clip-coef".split()]
    rules += [(f, given[f] >= 0, ">= 0") for f in "ent-coef vf-coef kl-coef kl-target".split()]
    rules += [(f, given[f] <= float32_max, f"<= {float32_max:.2g}, a float32 clamp bound") for f in ("rho-bar", "clip-coef")]
    rules += [
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32)"),
        ("total-timesteps", args.total_timesteps >= batch, f">= one batch ({batch} samples)"),
        ("num-steps", batch >= 2, ">= 2 with --rollouts-per-batch 1 --num-envs-per-actor 1: a variance needs 2 samples"),
        ("num-minibatches", equal_minibatches, f"a divisor of the batch ({batch} samples)"),
        ("num-minibatches", not args.norm_adv or two_per_minibatch, f"<= {batch // 2} with --norm-adv: a std needs 2 samples"),
        ("learning-rate", adam_fits, f"< {0.1 * float32_max:.2g}, or Adam's first step overflows float32"),
        ("c-bar", 0 < args.c_bar <= args.rho_bar, f"in (0, --rho-bar] = (0, {args.rho_bar}], as V-trace requires"),
        ("max-policy-lag", args.max_policy_lag is None or args.max_policy_lag >= 0, ">= 0 (or unset)"),
        ("max-actor-restarts", args.max_actor_restarts >= 0, ">= 0"),
        ("wait-timeout", 0 < args.wait_timeout <= 2_147_483, "in (0, 2147483] seconds"),  # a pipe waits <= 2**31 - 1 ms
        ("capture-video", not args.capture_video or importlib.util.find_spec("moviepy"), "off without moviepy"),
        ("track", not args.track or importlib.util.find_spec("wandb"), "off without wandb"),
    ]
    for flag, valid, valid_range in rules:
        if not valid:
            raise SystemExit(f"error: --{flag} must be {valid_range} (got {given[flag]})")
    try:
        env = make_env(args.env_id, 0, False, "")()  # only to check its spaces: the learner steps no env
    except gym.error.Error as e:  # an unknown id, or a package it needs is missing (Atari ids: ale-py)
        raise SystemExit(f"error: --env-id {args.env_id}: {e}") from None
    env.close()
    vector_observations = isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1
    known_observations = vector_observations or is_atari(args.env_id)
    if not (known_observations and isinstance(env.action_space, (gym.spaces.Discrete, gym.spaces.Box))):
        raise SystemExit(
            f"error: --env-id {args.env_id} has {env.observation_space} observations, {env.action_space}"
            " actions; vaco_async_mp.py takes vector (1-D Box) observations or Atari frames, Discrete or"
            " Box actions"
        )
    return env.observation_space, env.action_space


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    observation_space, action_space = check_args(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    start_process_server()  # now, so that its imports overlap the learner's setup below

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # one intra-op thread, as the actors: more would fight them for the cores, and these small minibatches gain
    # nothing from them (tests/results/README.md, "The learner's threads")
    torch.set_num_threads(1)

    if args.track:
        import wandb

        wandb_options = dict(sync_tensorboard=True, config=vars(args), name=run_name, monitor_gym=True, save_code=True)
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, **wandb_options)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    agent = Agent(observation_space, action_space).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    # the learner's copy of a batch: its rollouts side by side along the env axis
    batch_envs = args.rollouts_per_batch * args.num_envs_per_actor
    batch = rollout_buffers(args.num_steps, batch_envs, observation_space, action_space)
    batch = {key: buffer.to(device) for key, buffer in batch.items()}
    stop = threading.Event()

    def request_stop(signum, frame):  # Ctrl-C, SIGTERM: end after this iteration, save; a second Ctrl-C aborts
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    actors = ActorPool(args, agent, observation_space, action_space, run_name, writer)
    try:
        lag_counts = train(args, agent, optimizer, actors, batch, writer, stop)
    finally:  # also on errors: no actor outlives the learner, the logs are written
        actors.close()
        writer.close()
    print(f"policy lag of the trained rollouts (versions: count): {dict(sorted(lag_counts.items()))}")

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save({"model": agent.state_dict(), "args": vars(args)}, model_path)
        print(f"model saved to {model_path}")
    if stop.is_set():
        raise SystemExit(130)
