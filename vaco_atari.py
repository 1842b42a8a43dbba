# VACO on Atari games (Breakout by default) with the standard preprocessing and the Nature CNN.
# Paper: "Align and Filter: Improving Performance in Asynchronous On-Policy RL", arXiv 2603.01365.
# ALIGN re-estimates advantages of the learner's policy from lagged data with V-trace, once per batch;
# FILTER drops, per minibatch, the samples that would push the policy further out of a TV trust region.
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter

gym.register_envs(ale_py)  # the ALE/...-v5 and ...NoFrameskip-v4 ids; the game ROMs ship with ale-py

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
    """also log to Weights and Biases (imported only then)"""
    wandb_project_name: str = "vaco"
    """Weights and Biases project"""
    wandb_entity: str | None = None
    """Weights and Biases entity (user or team)"""
    capture_video: bool = False
    """record videos of the first environment to `videos/{run_name}` (needs moviepy)"""
    save_model: bool = False
    """whether to save the final model to `runs/{run_name}`"""
    eval_episodes: int = 10
    """with --save-model: games (all lives) of greedy evaluation of the saved model after training (0 to skip)"""

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
    clip_coef: float = 0.1
    """the surrogate clipping coefficient of `ppo`, and the penalty scale of `spo`"""
    policy_lag: int = 0
    """simulated lag K: the rollout of iteration T is collected with the parameters of iteration T - K"""

    # derived from the flags above
    batch_size: int = 0
    """samples per batch (set at start-up)"""
    minibatch_size: int = 0
    """samples per minibatch (set at start-up)"""
    num_iterations: int = 0
    """learner iterations of the run (set at start-up)"""


def check_args(args):
    """Stop with a one-line message, before any training, on input the run cannot use."""
    problems = [
        (args.tv_delta <= 0, f"--tv-delta must be > 0 (got {args.tv_delta}); the paper uses 0.2"),
        (min(args.rho_bar, args.c_bar) <= 0, f"--rho-bar and --c-bar must be > 0 (got {args.rho_bar}, {args.c_bar})"),
        (args.rho_bar < args.c_bar,
         f"--rho-bar ({args.rho_bar}) must be >= --c-bar ({args.c_bar}), as V-trace requires"),
        (args.policy_lag < 0, f"--policy-lag must be >= 0 (got {args.policy_lag})"),
        (min(args.num_envs, args.num_steps, args.num_minibatches, args.update_epochs) < 1,
         "--num-envs, --num-steps, --num-minibatches and --update-epochs must be >= 1"),
        (args.num_envs * args.num_steps % max(args.num_minibatches, 1) != 0,
         f"the batch of --num-envs x --num-steps = {args.num_envs * args.num_steps} samples does not split into "
         f"--num-minibatches {args.num_minibatches} equal minibatches; pick a divisor"),
        (args.total_timesteps < args.num_envs * args.num_steps,
         f"--total-timesteps {args.total_timesteps} is less than one batch ({args.num_envs * args.num_steps} steps)"),
        (args.policy_loss != "vaco" and args.clip_coef <= 0, f"--clip-coef must be > 0 (got {args.clip_coef})"),
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
        spec = gym.spec(args.env_id)
    except gym.error.Error:
        raise SystemExit(f"error: unknown --env-id {args.env_id!r}; try BreakoutNoFrameskip-v4 or ALE/Pong-v5")
    if spec.entry_point != "ale_py.env:AtariEnv":
        raise SystemExit(f"error: --env-id {args.env_id!r} is not an Atari game; vaco_atari.py takes ids such as "
                         "BreakoutNoFrameskip-v4 or ALE/Pong-v5 (vector observations: use vaco_classic.py)")


class NoopReset(gym.Wrapper):
    """Start every game with 1 to noop_max no-op actions, so that the agent sees varied initial states."""

    def __init__(self, env, noop_max=30):
        super().__init__(env)
        self.noop_max = noop_max

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.np_random.integers(1, self.noop_max + 1)):
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class MaxAndSkip(gym.Wrapper):
    """Repeat each action for `skip` frames and sum their rewards. The observation is the pixel-wise max of the
    last two frames, because some games draw their sprites only every other frame."""

    def __init__(self, env, skip=4):
        super().__init__(env)
        self.skip = skip

    def step(self, action):
        total_reward, frames = 0.0, deque(maxlen=2)
        for _ in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            frames.append(obs)
            total_reward += reward
            if terminated or truncated:
                break
        return np.maximum(frames[0], frames[-1]), total_reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """A life loss ends the training episode (terminated), but the game is reset only on a real game over:
    after a life loss, reset() takes one no-op step and the same game goes on."""

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
    """Press FIRE, then action 2, after every reset, for the games that wait for it (Breakout's ball is launched
    with FIRE); under EpisodicLife this happens after each life loss too."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info


def make_env(env_id, idx, capture_video, run_name):
    def thunk():
        # the id's own frame skipping is turned off, MaxAndSkip does it; sticky actions of ALE/...-v5 ids stay on
        ale_kwargs = dict(frameskip=1, obs_type="grayscale")
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array", **ale_kwargs)
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        else:
            env = gym.make(env_id, **ale_kwargs)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # under all of the preprocessing: the score of a whole game
        env = NoopReset(env, noop_max=30)
        env = MaxAndSkip(env, skip=4)
        env = EpisodicLife(env)
        if env.unwrapped.get_action_meanings()[1] == "FIRE":  # FIRE is action 1 in every game that has it
            env = FireReset(env)
        env = gym.wrappers.TransformReward(env, lambda reward: float(np.sign(reward)))
        env = gym.wrappers.ResizeObservation(env, (84, 84))
        env = gym.wrappers.FrameStackObservation(env, stack_size=4)
        return env

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights of gain `std` and a constant bias, the usual initialization of PPO networks."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Nature CNN trunk shared by the actor and the critic heads."""

    def __init__(self, observation_space, action_space):
        super().__init__()
        self.network = nn.Sequential(
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

    def features(self, x):
        return self.network(x / 255.0)  # frames are stored as uint8 in [0, 255]

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


def evaluate(model_path, args, run_name, device):
    """Greedy games (argmax action) of the saved model; a game counts all of its lives."""
    checkpoint = torch.load(model_path, map_location=device)
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, 0, args.capture_video, f"{run_name}-eval")],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    agent = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    agent.load_state_dict(checkpoint["model"])
    obs, _ = envs.reset(seed=args.seed + 10_000)
    episodic_returns = []
    while len(episodic_returns) < args.eval_episodes:
        with torch.no_grad():
            action = agent.get_dist(torch.as_tensor(obs, dtype=torch.float32, device=device)).mode
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if "final_info" in infos and "episode" in infos["final_info"]:
            episodic_returns.append(float(infos["final_info"]["episode"]["r"][0]))
    envs.close()
    return episodic_returns


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    check_args(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup: same-step autoreset, so a step that ends an episode reports its final observation and statistics
    try:
        envs = gym.vector.SyncVectorEnv(
            [make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
    except gym.error.DependencyNotInstalled as e:
        raise SystemExit(f"error: {args.env_id} needs a package that is not installed: {e}")

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}")
    flag_table = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
    writer.add_text("hyperparameters", f"|flag|value|\n|-|-|\n{flag_table}")

    agent = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    # simulated policy lag: the actors act with the parameters of K iterations ago (critic included)
    behavior = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    snapshots = deque(maxlen=args.policy_lag + 1)

    # rollout storage, [T, N, ...]
    T, N = args.num_steps, args.num_envs
    obs = torch.zeros((T, N) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)  # 4x less than float
    actions = torch.zeros((T, N), dtype=torch.long).to(device)
    logprobs = torch.zeros((T, N)).to(device)  # behavior log-probs, log beta(a|s)
    rewards = torch.zeros((T, N)).to(device)
    dones = torch.zeros((T, N)).to(device)  # dones[t]: the episode ended at step t
    values = torch.zeros((T, N)).to(device)  # behavior critic at rollout time

    # start
    global_step = 0
    start_time = time.time()
    next_obs, _ = envs.reset(seed=args.seed)
    envs.action_space.seed(args.seed)
    next_obs = torch.as_tensor(next_obs, device=device)  # uint8 frames
    recent_returns = deque(maxlen=20)
    model_path = f"runs/{run_name}/{args.exp_name}.pt"
    stop_requested = False

    def request_stop(signum, frame):
        """Ctrl-C or SIGTERM: finish the current iteration, then save and close the logs; a second Ctrl-C aborts."""
        global stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    for iteration in range(1, args.num_iterations + 1):
        if stop_requested:
            print(f"interrupted at step {global_step}; closing the logs{' and saving the model' * args.save_model}")
            break
        snapshots.append({k: v.detach().clone() for k, v in agent.state_dict().items()})
        behavior.load_state_dict(snapshots[0])
        batch_lag = len(snapshots) - 1
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

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
            next_obs = torch.as_tensor(next_obs, device=device)  # uint8 frames
            if "final_obs" in infos:
                # time-limit truncation is not a real terminal: bootstrap the reward with the rollout critic
                truncated = np.flatnonzero(truncations & ~terminations)
                if len(truncated) > 0:
                    final_obs = torch.as_tensor(np.stack(infos["final_obs"][truncated]), dtype=torch.float32,
                                                device=device)
                    with torch.no_grad():
                        rewards[step, truncated] += args.gamma * behavior.get_value(final_obs)
                episodes = infos["final_info"].get("_episode", np.zeros(N, dtype=bool))
                for i in np.flatnonzero(episodes):
                    episodic_return = float(infos["final_info"]["episode"]["r"][i])
                    recent_returns.append(episodic_return)
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", infos["final_info"]["episode"]["l"][i], global_step)

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
                    rewards, values, behavior.get_value(next_obs), dones, torch.zeros_like(log_rhos),
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

        # share of the value targets' variance that the critic explains (1: perfect, <= 0: useless)
        target_var = b_returns.var().item()
        explained_var = np.nan if target_var == 0 else 1 - (b_returns - b_values).var().item() / target_var

        # log the iteration
        logged = {key: np.mean([stats[key] for stats in minibatch_stats]) for key in minibatch_stats[0]}
        logged.update(align_stats)
        logged.update({"losses/explained_variance": explained_var, "charts/policy_lag": batch_lag,
                       "charts/learning_rate": optimizer.param_groups[0]["lr"],
                       "charts/SPS": int(global_step / (time.time() - start_time))})
        for key, value in logged.items():
            writer.add_scalar(key, value, global_step)
        if iteration % 10 == 0 or iteration == args.num_iterations:
            recent = f"{np.mean(recent_returns):8.2f}" if recent_returns else "     n/a"
            print(f"step {global_step:>9} | return {recent} | SPS {logged['charts/SPS']:>6} | "
                  f"tv {logged['losses/tv']:.3f} | filtered {logged['losses/filtered_frac']:.3f}", flush=True)

    if args.save_model:
        torch.save({"model": agent.state_dict(), "args": vars(args)}, model_path)
        print(f"model saved to {model_path}")
        if args.eval_episodes > 0 and not stop_requested:
            episodic_returns = evaluate(model_path, args, run_name, device)
            for idx, episodic_return in enumerate(episodic_returns):
                writer.add_scalar("eval/episodic_return", episodic_return, idx)
            print(f"eval: mean return {np.mean(episodic_returns):.2f} over {len(episodic_returns)} greedy episodes")

    envs.close()
    writer.close()
    if stop_requested:
        sys.exit(130)
