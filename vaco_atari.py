# VACO on Atari games (Breakout by default) with the standard preprocessing and the Nature CNN.
# Paper: "Align and Filter: Improving Performance in Asynchronous On-Policy RL", arXiv 2603.01365.
# ALIGN re-estimates advantages of the learner's policy from lagged data with V-trace, once per batch;
# FILTER drops, per minibatch, the samples that would push the policy further out of a TV trust region.
import importlib.util
import os
import random
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import ale_py  # importing it registers the ALE/...-v5 and ...NoFrameskip-v4 ids; the ROMs ship with it
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter

# Argument checks of torch.distributions cost time on every step; our inputs are well-formed.
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
    """train on the GPU when one is available"""
    track: bool = False
    """also log to Weights and Biases (needs wandb)"""
    wandb_project_name: str = "vaco"
    """Weights and Biases project"""
    wandb_entity: str | None = None
    """Weights and Biases entity (user or team)"""
    capture_video: bool = False
    """record videos of the first environment to `videos/{run_name}` (needs moviepy)"""
    save_model: bool = False
    """whether to save the final model to `runs/{run_name}`"""
    eval_episodes: int = 10
    """with --save-model: greedy episodes of the saved model, as charts/episodic_return counts them (0 to skip)"""

    # rollouts and optimization
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the Atari game (`...NoFrameskip-v4` or `ALE/...-v5`)"""
    total_timesteps: int = 10000000
    """environment steps of the whole run, all environments together"""
    learning_rate: float = 2.5e-4
    """Adam's learning rate (decayed linearly to 0 with --anneal-lr)"""
    num_envs: int = 8
    """environments stepped side by side"""
    num_steps: int = 128
    """steps per environment in one rollout"""
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
    clip_coef: float = 0.1
    """the surrogate clipping coefficient of `ppo`, and the penalty scale of `spo`"""
    kl_coef: float = 0.1
    """`ppo-kl`: weight of the KL penalty (its starting value with --kl-target)"""
    kl_target: float = 0.0
    """`ppo-kl`: > 0 adapts --kl-coef once per iteration, x2 if the mean KL > 1.5 target, /2 if < target / 1.5"""
    tv_anchor: Literal["behavior", "learner"] = "behavior"
    """the loss's ratio: pi_theta / beta, or (`learner`) pi_theta / pi_T with advantages x min(rho_bar, pi_T / beta)"""
    policy_lag: int = 0
    """simulated lag K: the rollout of iteration T is collected with the parameters of iteration T - K"""


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


def make_env(env_id, idx, capture_video, run_name):
    def thunk():
        env = gym.make(
            env_id, render_mode="rgb_array" if capture_video and idx == 0 else None, frameskip=1, obs_type="grayscale"
        )  # AtariPreprocessing skips the frames; ALE/...-v5's sticky actions stay on
        if capture_video and idx == 0:
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        env = gym.wrappers.RecordEpisodeStatistics(env)  # under all reward/episode wrappers: it records the true return
        # 1 to 30 no-ops on reset, 4 frames per action (max of the last two), 84x84 grayscale; lives: EpisodicLife
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
        env = EpisodicLife(env)
        if env.unwrapped.get_action_meanings()[1] == "FIRE":  # FIRE is action 1 in every game that has it
            env = FireReset(env)
        env = gym.wrappers.TransformReward(env, lambda reward: float(np.sign(reward)))
        return gym.wrappers.FrameStackObservation(env, stack_size=4)

    return thunk


# Orthogonal weights of gain `std` and a constant bias, the usual initialization of PPO networks.
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, observation_space, action_space):
        super().__init__()
        self.network = nn.Sequential(  # the Nature CNN, the trunk of both heads; frames are uint8, scaled to [0, 1]
            layer_init(nn.Conv2d(observation_space.shape[0], 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)),
            nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(512, int(action_space.n)), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)

    def get_value(self, x):
        return self.critic(self.network(x / 255.0)).squeeze(-1)

    def get_dist(self, x):
        return Categorical(logits=self.actor(self.network(x / 255.0)))

    def get_action_and_value(self, x, action=None):
        hidden = self.network(x / 255.0)  # one pass of the trunk for both heads
        dist = Categorical(logits=self.actor(hidden))
        action = dist.sample() if action is None else action
        logprob, entropy = dist.log_prob(action), dist.entropy()
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


# The returns of --eval-episodes greedy episodes (the mode of the action distribution) of the saved model.
def evaluate(model_path, args, run_name, device):
    checkpoint = torch.load(model_path, map_location=device)
    env = make_env(args.env_id, 0, args.capture_video, f"{run_name}-eval")()
    agent = Agent(env.observation_space, env.action_space).to(device)
    agent.load_state_dict(checkpoint["model"])
    obs, _ = env.reset(seed=args.seed + 10_000)
    episodic_returns = []
    while len(episodic_returns) < args.eval_episodes:
        with torch.no_grad():
            action = agent.get_dist(torch.as_tensor(obs[None], dtype=torch.float32, device=device)).mode[0]
        obs, _, terminated, truncated, info = env.step(action.cpu().numpy())
        if "episode" in info:
            episodic_returns.append(float(info["episode"]["r"]))
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return episodic_returns


# Stop with one line naming the flag, its value and its valid range, before anything is created.
def check_args(args):
    given = {name.replace("_", "-"): value for name, value in vars(args).items()}  # flag -> its value
    batch = args.num_envs * args.num_steps
    two_per_minibatch = batch >= 2 * args.num_minibatches  # each minibatch normalizes its advantages by their std
    float32_max = torch.finfo(torch.float32).max
    adam_fits = args.learning_rate / (1 - 0.9) <= float32_max  # Adam's first step, as torch computes it
    rules = [(f, np.isfinite(value), "a finite number") for f, value in given.items() if isinstance(value, float)]
    rules += [(f, given[f] >= 1, ">= 1") for f in ("num-envs", "num-steps", "update-epochs")]
    rules += [(f, 0 <= given[f] <= 1, "in [0, 1]") for f in ("gamma", "gae-lambda")]
    rules += [(f, given[f] > 0, "> 0") for f in "learning-rate max-grad-norm tv-delta rho-bar clip-coef".split()]
    rules += [(f, given[f] >= 0, ">= 0") for f in "ent-coef vf-coef kl-coef kl-target policy-lag eval-episodes".split()]
    rules += [(f, given[f] <= float32_max, f"<= {float32_max:.2g}, a float32 clamp bound") for f in ("rho-bar", "clip-coef")]
    rules += [
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32)"),
        ("total-timesteps", args.total_timesteps >= batch, f">= one batch of --num-envs x --num-steps = {batch}"),
        ("num-steps", batch >= 2, ">= 2 with --num-envs 1: a variance needs 2 samples"),
        ("num-minibatches", args.num_minibatches >= 1 and batch % args.num_minibatches == 0, f"a divisor of {batch}"),
        ("num-minibatches", not args.norm_adv or two_per_minibatch, f"<= {batch // 2} with --norm-adv: a std needs 2 samples"),
        ("learning-rate", adam_fits, f"< {0.1 * float32_max:.2g}, or Adam's first step overflows float32"),
        ("c-bar", 0 < args.c_bar <= args.rho_bar, f"in (0, --rho-bar] = (0, {args.rho_bar}], as V-trace requires"),
        ("capture-video", not args.capture_video or importlib.util.find_spec("moviepy"), "off without moviepy"),
        ("track", not args.track or importlib.util.find_spec("wandb"), "off without wandb"),
    ]
    for flag, valid, valid_range in rules:
        if not valid:
            raise SystemExit(f"error: --{flag} must be {valid_range} (got {given[flag]})")
    try:
        env = gym.make(args.env_id)  # only to check its spaces
    except gym.error.Error as e:  # an unknown id, or a package it needs is missing
        raise SystemExit(f"error: --env-id {args.env_id}: {e}") from None
    env.close()
    if not isinstance(env.unwrapped, ale_py.AtariEnv):
        raise SystemExit(
            f"error: --env-id {args.env_id} is not an Atari game; vaco_atari.py takes ids such as "
            "BreakoutNoFrameskip-v4 or ALE/Pong-v5 (vector observations: vaco_classic.py)"
        )


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    check_args(args)
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(1)  # rounding, so a seed's run, depends on the thread count; more threads are no faster here
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup: same-step autoreset, so a step that ends an episode reports its final observation and statistics
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )

    if args.track:
        import wandb

        wandb_options = dict(sync_tensorboard=True, config=vars(args), name=run_name, monitor_gym=True, save_code=True)
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, **wandb_options)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    agent = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    # simulated policy lag: the actors act with the parameters of K iterations ago (critic included)
    behavior = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    snapshots = deque(maxlen=args.policy_lag + 1)

    # start
    global_step = 0
    start_time = time.time()
    recent_returns = deque(maxlen=20)  # the last episodic returns, for the progress line
    stop_requested = False  # set by Ctrl-C or SIGTERM
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs, device=device)  # the dtype the environments give, kept by the storage

    # rollout storage, [T, N, ...]; actions as floats, Discrete ones too (Categorical.log_prob casts them to long)
    T, N = args.num_steps, args.num_envs
    obs = torch.zeros((T, N) + envs.single_observation_space.shape, dtype=next_obs.dtype, device=device)
    actions = torch.zeros((T, N) + envs.single_action_space.shape, device=device)
    # behavior log-probs log beta(a|s), rewards, dones[t] (the episode ended at step t), behavior critic's values
    logprobs, rewards, dones, values = (torch.zeros((T, N), device=device) for _ in range(4))

    def request_stop(signum, frame):  # Ctrl-C, SIGTERM: end after this iteration, save; a second Ctrl-C aborts
        global stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    for iteration in range(1, num_iterations + 1):
        if stop_requested:
            print(f"interrupted at step {global_step}")
            break
        snapshots.append({k: v.detach().clone() for k, v in agent.state_dict().items()})
        behavior.load_state_dict(snapshots[0])
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            with torch.no_grad():
                action, logprob, _, value = behavior.get_action_and_value(next_obs)
            values[step], actions[step], logprobs[step] = value, action, logprob

            # step the environments; episodes that end report their final observation and statistics
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            dones[step] = torch.as_tensor(terminations | truncations, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(next_obs, device=device)
            if "final_obs" in infos:
                # time-limit truncation is not a real terminal: bootstrap the reward with the rollout critic
                truncated = np.flatnonzero(truncations & ~terminations)
                if len(truncated) > 0:
                    final_obs = torch.as_tensor(np.stack(infos["final_obs"][truncated]), dtype=torch.float32, device=device)
                    with torch.no_grad():
                        rewards[step, truncated] += args.gamma * behavior.get_value(final_obs)
                for i in np.flatnonzero(infos["final_info"].get("_episode", [])):
                    episodic_return = float(infos["final_info"]["episode"]["r"][i])
                    recent_returns.append(episodic_return)
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", infos["final_info"]["episode"]["l"][i], global_step)

        # ALIGN: once per batch, the advantages of the learner snapshot pi_T with the latest critic
        with torch.no_grad():
            b_obs = obs.flatten(0, 1)
            b_actions = actions.flatten(0, 1)
            b_logprobs = logprobs.flatten()
            _, b_learner_logprobs, _, b_learner_values = agent.get_action_and_value(b_obs, b_actions)
            b_rhos = (b_learner_logprobs - b_logprobs).exp()  # pi_T / beta
            if args.realign:  # V-trace with pi_T's log-probs and the latest critic
                log_rhos = (b_learner_logprobs - b_logprobs).view(T, N)
                b_values = b_learner_values
                bootstrap_value = agent.get_value(next_obs)
            else:  # naive asynchronous PPO: GAE (rho = 1) over the values the behavior network gave at rollout time
                log_rhos = torch.zeros_like(values)
                b_values = values.flatten()
                bootstrap_value = behavior.get_value(next_obs)
            advantages, returns = compute_vtrace(
                rewards=rewards,
                values=b_values.view(T, N),
                bootstrap_value=bootstrap_value,
                dones=dones,
                log_rhos=log_rhos,
                gamma=args.gamma,
                gae_lambda=args.gae_lambda,
                rho_bar=args.rho_bar,
                c_bar=args.c_bar,
            )
            b_advantages, b_returns = advantages.flatten(), returns.flatten()
            b_anchor_logprobs = b_learner_logprobs if args.tv_anchor == "learner" else b_logprobs
            tv_delta = adapt_tv_delta(args.tv_delta, (b_learner_logprobs - b_anchor_logprobs).exp(), args.tv_delta_rule)
            loss_coefs = dict(tv_delta=tv_delta, clip_coef=args.clip_coef, kl_coef=args.kl_coef, rho_bar=args.rho_bar)

        # FILTER: optimize the policy and value network, every minibatch against the behavior log-probs
        minibatch_stats = []
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb_inds = b_inds[start : start + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                if args.tv_anchor == "learner":  # the ratio is against pi_T: a truncated pi_T / beta corrects for beta
                    mb_advantages = mb_advantages * torch.clamp(b_rhos[mb_inds], max=args.rho_bar)

                pg_loss, pg_stats = policy_loss(
                    args.policy_loss, newlogprob, b_anchor_logprobs[mb_inds], mb_advantages, **loss_coefs
                )
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
            watched["log-prob at the next observations"] = agent.get_action_and_value(next_obs, actions[-1])[1]
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
        logged.update(
            {
                "losses/explained_variance": explained_var,
                "charts/policy_lag": len(snapshots) - 1,
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "align/rho_mean": b_rhos.mean().item(),
                "charts/SPS": int(global_step / (time.time() - start_time)),
                "charts/kl_coef": args.kl_coef,
                "align/tv_behavior": 0.5 * (b_rhos - 1).abs().mean().item(),
                "charts/tv_delta": tv_delta,
                "align/rho_clipped_frac": (b_rhos > args.rho_bar).float().mean().item(),
            }
        )
        for key, value in logged.items():
            writer.add_scalar(key, value, global_step)
        args.kl_coef = adapt_kl_coef(args.kl_coef, logged["losses/approx_kl"], args.kl_target)
        if iteration % 10 == 0 or iteration == num_iterations:
            recent = f"{np.mean(recent_returns):8.2f}" if recent_returns else "     n/a"
            print(
                f"step {global_step:>9} | return {recent} | SPS {logged['charts/SPS']:>6} | "
                f"tv {logged['losses/tv']:.3f} | filtered {logged['losses/filtered_frac']:.3f}",
                flush=True,
            )

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.pt"
        checkpoint = {"model": agent.state_dict(), "args": vars(args)}
        torch.save(checkpoint, model_path)
        print(f"model saved to {model_path}")
        if args.eval_episodes > 0 and not stop_requested:
            episodic_returns = evaluate(model_path, args, run_name, device)
            for idx, episodic_return in enumerate(episodic_returns):
                writer.add_scalar("eval/episodic_return", episodic_return, idx)
            print(f"eval: mean return {np.mean(episodic_returns):.2f} over {len(episodic_returns)} greedy episodes")

    envs.close()
    writer.close()
    if stop_requested:
        raise SystemExit(130)
