"""compute_vtrace and policy_loss of every script against independent references written from the spec, and the
training loops of vaco_classic.py and vaco_atari.py watched step by step: the simulated lag, the truncation bootstrap,
ALIGN's inputs and FILTER's, recomputed here.

The scripts share no code on purpose, so each one's copy is tested, and the copies must stay textually identical.
"""

import importlib
import inspect
import math

import numpy as np
import pytest
import torch
from conftest import record_env_steps, record_updates, run_main

SCRIPTS_WITH_A_CRITIC = ["vaco_classic", "vaco_atari", "vaco_async_mp"]
ALL_SCRIPTS = SCRIPTS_WITH_A_CRITIC + ["vaco_llm_math"]  # GRPO-style: policy_loss only


@pytest.fixture(params=SCRIPTS_WITH_A_CRITIC)
def compute_vtrace(request):
    return importlib.import_module(request.param).compute_vtrace


@pytest.fixture(params=ALL_SCRIPTS)
def policy_loss(request):
    return importlib.import_module(request.param).policy_loss


@pytest.mark.parametrize(
    "function,scripts",
    [
        ("compute_vtrace", SCRIPTS_WITH_A_CRITIC),
        ("policy_loss", ALL_SCRIPTS),
        ("adapt_kl_coef", ALL_SCRIPTS),
        ("adapt_tv_delta", SCRIPTS_WITH_A_CRITIC),
    ],
)
def test_every_script_has_the_same_text_of_the_spec_functions(function, scripts):
    sources = {name: inspect.getsource(getattr(importlib.import_module(name), function)) for name in scripts}
    assert len(set(sources.values())) == 1, f"{function} differs between {', '.join(scripts)}"


def random_batch(T=9, N=3, seed=0, done_prob=0.2, lag_scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return dict(
        rewards=torch.randn(T, N, generator=g, dtype=torch.float64),
        values=torch.randn(T, N, generator=g, dtype=torch.float64),
        bootstrap_value=torch.randn(N, generator=g, dtype=torch.float64),
        dones=(torch.rand(T, N, generator=g) < done_prob).double(),
        log_rhos=lag_scale * torch.randn(T, N, generator=g, dtype=torch.float64),
    )


def reference_vtrace(rewards, values, bootstrap_value, dones, log_rhos, gamma, lam, rho_bar, c_bar):
    """Spec section 2, one environment and one step at a time, on Python floats."""
    T, N = len(rewards), len(rewards[0])
    advantages = [[0.0] * N for _ in range(T)]
    returns = [[0.0] * N for _ in range(T)]
    for n in range(N):
        acc_next = 0.0  # acc[T] = 0
        for t in reversed(range(T)):
            v_next = bootstrap_value[n] if t == T - 1 else values[t + 1][n]
            not_done = 1.0 - dones[t][n]
            rho = min(rho_bar, math.exp(log_rhos[t][n]))
            c = lam * min(c_bar, math.exp(log_rhos[t][n]))
            delta = rewards[t][n] + gamma * not_done * v_next - values[t][n]
            advantages[t][n] = delta + gamma * lam * not_done * acc_next
            acc = rho * delta + gamma * not_done * c * acc_next
            returns[t][n] = values[t][n] + acc
            acc_next = acc
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def reference_gae(rewards, values, bootstrap_value, dones, gamma, lam):
    """Textbook GAE(lambda) with dones[t] = the episode ended at step t."""
    T, N = rewards.shape
    advantages = torch.zeros(T, N, dtype=torch.float64)
    last = torch.zeros(N, dtype=torch.float64)
    for t in reversed(range(T)):
        next_value = bootstrap_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * (1 - dones[t]) * next_value - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


@pytest.mark.parametrize("rho_bar,c_bar,lam", [(1.0, 1.0, 0.95), (2.0, 0.5, 0.9), (1.5, 1.5, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vtrace_matches_reference_loops(compute_vtrace, rho_bar, c_bar, lam, seed):
    b = random_batch(seed=seed)
    gamma = 0.97
    adv, ret = compute_vtrace(**b, gamma=gamma, gae_lambda=lam, rho_bar=rho_bar, c_bar=c_bar)
    ref_adv, ref_ret = reference_vtrace(*(b[k].tolist() for k in b), gamma, lam, rho_bar, c_bar)
    assert b["dones"].sum() > 0 and (b["log_rhos"].exp() > rho_bar).any() and (b["log_rhos"].exp() < c_bar).any()
    # float64 on O(1) inputs, 9 steps: the two orders of operations agree to ~1e-15; a wrong term moves O(0.1)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)


def test_vtrace_without_lag_is_gae(compute_vtrace):
    b = random_batch(seed=3)
    b["log_rhos"] = torch.zeros_like(b["log_rhos"])
    adv, ret = compute_vtrace(**b, gamma=0.99, gae_lambda=0.95, rho_bar=1.0, c_bar=1.0)
    gae_adv, gae_ret = reference_gae(b["rewards"], b["values"], b["bootstrap_value"], b["dones"], 0.99, 0.95)
    # float64 on O(1) inputs over 9 steps: rounding ~1e-15
    torch.testing.assert_close(adv, gae_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, gae_ret, rtol=1e-12, atol=1e-12)


def test_vtrace_lambda_one_is_impala_advantage(compute_vtrace):
    b = random_batch(seed=4)
    gamma = 0.9
    adv, ret = compute_vtrace(**b, gamma=gamma, gae_lambda=1.0, rho_bar=1.0, c_bar=1.0)
    next_vs = torch.cat([ret[1:], b["bootstrap_value"][None]])  # v_{t+1}; past the last step v_T = V(s_T)
    impala = b["rewards"] + gamma * (1 - b["dones"]) * next_vs - b["values"]
    torch.testing.assert_close(adv, impala, rtol=1e-12, atol=1e-12)  # float64, O(1) values: rounding ~1e-15


def test_vtrace_ignores_what_follows_a_done(compute_vtrace):
    b = random_batch(T=4, N=1, seed=5, done_prob=0.0)
    b["dones"][1, 0] = 1.0
    adv, ret = compute_vtrace(**b, gamma=0.99, gae_lambda=0.95, rho_bar=1.0, c_bar=1.0)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["rewards"][2:] += 100.0
    b2["bootstrap_value"] += 100.0
    adv2, ret2 = compute_vtrace(**b2, gamma=0.99, gae_lambda=0.95, rho_bar=1.0, c_bar=1.0)
    # exact by construction: the done multiplies everything after it by 0
    torch.testing.assert_close(adv[:2], adv2[:2], rtol=0, atol=0)
    torch.testing.assert_close(ret[:2], ret2[:2], rtol=0, atol=0)
    assert not torch.allclose(adv[2:], adv2[2:])  # they differ by ~100


def minibatch(n=64, seed=0, lag=0.3):
    g = torch.Generator().manual_seed(seed)
    behavior = -1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    new = (behavior + lag * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    return new, behavior, advantages


def test_vaco_keeps_every_sample_inside_the_trust_region(policy_loss):
    new, behavior, adv = minibatch(lag=0.02)
    ratio = (new - behavior).exp()
    l1 = (ratio - 1).abs().mean().item()
    loss, stats = policy_loss("vaco", new, behavior, adv, tv_delta=l1 + 1e-3, clip_coef=0.2, kl_coef=0.1)
    # float64 means of 64 O(1) terms, the same operations: equal to ~1e-15 (absolute: the mean may be near 0)
    torch.testing.assert_close(loss, -(adv * ratio).mean(), rtol=0, atol=1e-12)
    assert stats == pytest.approx({"tv": 0.5 * l1, "filtered_frac": 0.0, "gate": 0.0}, rel=1e-12, abs=1e-12)


def test_vaco_drops_exactly_the_samples_that_push_away_outside_the_trust_region(policy_loss):
    new, behavior, adv = minibatch(lag=0.5)
    ratio = (new - behavior).exp()
    l1 = (ratio - 1).abs().mean().item()
    loss, stats = policy_loss("vaco", new, behavior, adv, tv_delta=l1 - 1e-3, clip_coef=0.2, kl_coef=0.1)
    pushes_away = [a * (r - 1) > 0 for a, r in zip(adv.tolist(), ratio.tolist())]
    kept = [not p for p in pushes_away]
    expected = -sum(a * r for a, r, k in zip(adv.tolist(), ratio.tolist(), kept) if k) / len(kept)
    assert 0 < sum(pushes_away) < len(kept)
    # float64 means of 64 O(1) terms: rounding ~1e-15, absolute as well as relative because a mean can be near 0
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    fraction = sum(pushes_away) / len(kept)
    assert stats == pytest.approx({"tv": 0.5 * l1, "filtered_frac": fraction, "gate": 1.0}, rel=1e-12, abs=1e-12)

    # the gradient is -mean(m * A * grad r), with grad_logp r = r: zero on the dropped samples
    loss.backward()
    expected_grad = torch.tensor(
        [-a * r * k / len(kept) for a, r, k in zip(adv.tolist(), ratio.tolist(), kept)], dtype=torch.float64
    )
    torch.testing.assert_close(new.grad, expected_grad, rtol=1e-12, atol=1e-15)  # float64, entries ~1e-2: rounding ~1e-18


def test_vaco_gradient_step_never_increases_distance_of_kept_samples(policy_loss):
    new, behavior, adv = minibatch(lag=0.5, seed=7)
    loss, stats = policy_loss("vaco", new, behavior, adv, tv_delta=0.01, clip_coef=0.2, kl_coef=0.1)
    loss.backward()
    assert stats["gate"] == 1.0
    with torch.no_grad():
        before = ((new - behavior).exp() - 1).abs()
        after = ((new - 1e-3 * new.grad - behavior).exp() - 1).abs()
    assert bool((after <= before + 1e-12).all())  # 1e-12: float64 rounding of |r - 1| = O(0.1) where the step is ~0


def test_ppo_matches_clipped_surrogate(policy_loss):
    new, behavior, adv = minibatch(lag=0.4, seed=1)
    loss, stats = policy_loss("ppo", new, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=0.1)
    terms = []
    for a, r in zip(adv.tolist(), (new - behavior).exp().tolist()):
        terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12, abs=1e-12)  # float64, O(1) terms
    assert stats["filtered_frac"] == 0.0


def test_spo_matches_its_penalized_objective(policy_loss):
    new, behavior, adv = minibatch(lag=0.4, seed=2)
    eps = 0.3
    loss, _ = policy_loss("spo", new, behavior, adv, tv_delta=0.2, clip_coef=eps, kl_coef=0.1)
    terms = [a * r - abs(a) / (2 * eps) * (r - 1) ** 2 for a, r in zip(adv.tolist(), (new - behavior).exp().tolist())]
    assert loss.item() == pytest.approx(-sum(terms) / len(terms), rel=1e-12, abs=1e-12)  # float64, O(1) terms


@pytest.mark.parametrize("kl_coef", [0.0, 0.1, 1.0])
def test_ppo_kl_matches_its_penalized_objective_and_gradient(policy_loss, kl_coef):
    new, behavior, adv = minibatch(lag=0.4, seed=3)
    loss, stats = policy_loss("ppo-kl", new, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=kl_coef)
    ratios, n = (new - behavior).exp().tolist(), len(adv)
    # the penalty is the sample estimate of KL(beta || pi_theta): r - 1 - log r, with log r = new - behavior
    terms = [-a * r + kl_coef * (r - 1 - math.log(r)) for a, r in zip(adv.tolist(), ratios)]
    assert loss.item() == pytest.approx(sum(terms) / n, rel=1e-12, abs=1e-12)  # float64, O(1) terms
    assert stats["filtered_frac"] == 0.0
    loss.backward()  # d/dlogp of -A r + c (r - 1 - log r) = -A r + c (r - 1)
    expected_grad = torch.tensor([(-a * r + kl_coef * (r - 1)) / n for a, r in zip(adv.tolist(), ratios)], dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected_grad, rtol=1e-12, atol=1e-15)  # float64, entries ~1e-2


@pytest.mark.parametrize("script", ALL_SCRIPTS)
@pytest.mark.parametrize(
    "kl,target,expected",
    [
        (0.0151, 0.01, 0.2),
        (0.0149, 0.01, 0.1),
        (0.01, 0.01, 0.1),
        (0.0067, 0.01, 0.1),
        (0.0066, 0.01, 0.05),
        (1.0, 0.0, 0.1),
        (0.0, 0.0, 0.1),  # target 0: a fixed coefficient
    ],
)
def test_adaptive_kl_coef_doubles_above_one_and_a_half_targets_and_halves_below_two_thirds(script, kl, target, expected):
    adapt_kl_coef = importlib.import_module(script).adapt_kl_coef
    assert adapt_kl_coef(0.1, kl, target) == expected  # exact: doubling and halving only change a float's exponent


@pytest.mark.parametrize("script", SCRIPTS_WITH_A_CRITIC)
@pytest.mark.parametrize(
    "rhos,rule,expected",
    [
        ([0.5, 1.0, 2.0], "forward", 0.2 + (0.5 + 0.0 + 1.0) / 3),  # delta + mean|rho - 1|, by hand
        ([1.25, 0.75, 1.0, 1.0], "forward", 0.2 + 0.125),
        ([1.0, 1.0, 1.0], "forward", 0.2),  # no lag: the fixed bound
        ([0.5, 1.0, 2.0], "fixed", 0.2),
        ([1.0, 1.0], "fixed", 0.2),  # off: delta whatever the lag
    ],
)
def test_forward_tv_delta_adds_the_batch_lag_to_delta_and_fixed_keeps_delta(script, rhos, rule, expected):
    adapt_tv_delta = importlib.import_module(script).adapt_tv_delta
    # the rhos are float32: their mean |rho - 1| is rounded to ~6e-8 relative
    assert adapt_tv_delta(0.2, torch.tensor(rhos), rule) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rho_bar", [1.0, 1.5])
def test_impala_gradient_is_the_truncated_importance_weighted_score_function(policy_loss, rho_bar):
    """-mean(min(rho_bar, r) A grad log pi) on a softmax policy, by hand: the weight is not differentiated."""
    g = torch.Generator().manual_seed(5)
    n, k = 48, 4
    logits = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(k, (n,), generator=g)
    behavior = torch.log_softmax(logits.detach() + 0.6 * torch.randn(n, k, generator=g, dtype=torch.float64), -1)
    behavior = behavior[torch.arange(n), actions]
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    new = torch.log_softmax(logits, -1)[torch.arange(n), actions]
    loss, stats = policy_loss("impala", new, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=0.1, rho_bar=rho_bar)
    loss.backward()
    probs = torch.softmax(logits.detach(), -1).tolist()
    ratios = (new.detach() - behavior).exp().tolist()
    assert any(r > rho_bar for r in ratios) and any(r < rho_bar for r in ratios)  # both sides of the truncation
    expected = [[0.0] * k for _ in range(n)]
    for i in range(n):  # d log softmax(z)[a] / dz_j = 1[j = a] - p_j
        for j in range(k):
            score = (1.0 if j == actions[i] else 0.0) - probs[i][j]
            expected[i][j] = -min(rho_bar, ratios[i]) * adv[i].item() * score / n
    expected_grad = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-12, atol=1e-15)  # float64, entries ~1e-2
    assert stats["filtered_frac"] == 0.0


def test_all_losses_equal_the_policy_gradient_on_policy(policy_loss):
    """With pi_theta = beta (first minibatch, no lag) the five losses have the same gradient, and all but impala's
    (a weighted log-ratio, 0 here) the same value."""
    new, behavior, adv = minibatch(lag=0.0)
    grads = []
    for kind in ["vaco", "ppo", "spo", "ppo-kl", "impala"]:
        x = new.detach().clone().requires_grad_(True)
        loss, stats = policy_loss(kind, x, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=0.1)
        loss.backward()
        expected_loss = 0.0 if kind == "impala" else -adv.mean().item()
        assert loss.item() == pytest.approx(expected_loss, abs=1e-12)  # float64 mean of O(1) terms, near 0
        assert stats["tv"] == 0.0 and stats["gate"] == 0.0
        grads.append(x.grad)
    for grad in grads[1:]:  # float64, entries ~1e-2 (r = 1 exactly): equal to rounding
        torch.testing.assert_close(grads[0], grad, rtol=1e-12, atol=1e-15)


def test_unknown_policy_loss_is_refused(policy_loss):
    new, behavior, adv = minibatch()
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss("trpo", new, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=0.1)


# ---------------------------------------------------------------- the training loops feed them what the spec says
# Each synchronous script runs a few iterations in this process while every gradient step is watched
# (conftest.record_updates): the rollout of iteration T must come from the parameters of iteration T - K (the
# simulated lag), a time limit must add gamma * V_beta(final obs) to the reward and a real terminal must not (the
# truncation bootstrap), ALIGN must be V-trace on pi_T's log-probs and critic (or GAE on the behavior values with
# --no-realign), and every minibatch's loss must be FILTER on the normalized advantages against beta (or, with
# --tv-anchor learner, against pi_T with the advantages weighted by min(rho_bar, pi_T / beta)). Each check is
# recomputed here from the recorded tensors and a copy of pi_T, with the reference loops above.

LOOP_FLAGS = {  # short time limits (in the id's own steps: Atari frames), so that runs of a few iterations truncate
    "vaco_classic.py": (30, ["--num-envs", 2, "--num-steps", 64, "--total-timesteps", 640]),
    "vaco_atari.py": (
        400,
        ["--num-envs", 1, "--num-steps", 64, "--total-timesteps", 320, "--num-minibatches", 2, "--update-epochs", 2],
    ),
}
EVERY_STEP = ["iteration", "mb_inds", "newlogprob", "newvalue", "pg_loss", "pg_stats", "v_loss"]
FIRST_STEP = [
    "agent",
    "behavior",
    "obs",
    "actions",
    "logprobs",
    "rewards",
    "dones",
    "values",
    "next_obs",
    "b_learner_logprobs",
    "b_learner_values",
    "b_advantages",
    "b_returns",
    "tv_delta",
]


def vaco_loss(newlogprob, anchor_logprob, advantages, tv_delta):
    """Spec section 3 by hand: the gate on mean|r - 1|, then the mask A (r - 1) <= 0, the mean over all samples."""
    ratio = (newlogprob - anchor_logprob).exp()
    gate = (ratio - 1).abs().mean() > tv_delta
    keep = ~gate | (advantages * (ratio - 1) <= 0)
    return -(keep * advantages * ratio).mean().item(), float(gate)


def watch_training_loop(script, tmp_path, monkeypatch, *flags):
    """Run `script` in-process with a short time limit; returns (the recorded gradient steps, the env steps)."""
    import gymnasium as gym

    time_limit, base = LOOP_FLAGS[script]
    make = gym.make
    monkeypatch.setattr(gym, "make", lambda env_id, **kwargs: make(env_id, **{"max_episode_steps": time_limit, **kwargs}))
    updates = record_updates(monkeypatch, EVERY_STEP, FIRST_STEP)
    env_steps = record_env_steps(monkeypatch, gym.vector.SyncVectorEnv)
    error, _ = run_main(script, *base, *flags, cwd=tmp_path, monkeypatch=monkeypatch)
    assert error is None, error
    return updates, env_steps


@pytest.mark.parametrize("script", LOOP_FLAGS)
@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--tv-anchor", "learner"],
        ["--no-realign"],
        ["--tv-delta-rule", "forward"],
        ["--tv-delta-rule", "forward", "--tv-anchor", "learner"],
    ],
    ids=["default", "learner-anchor", "no-realign", "forward-delta", "forward-delta-learner"],
)
def test_the_training_loop_collects_with_lagged_parameters_aligns_and_filters_as_the_spec_says(
    script, flags, tmp_path, monkeypatch
):
    """Five or more iterations at lag 2 with a small delta (so the gate both fires and stays shut): every recorded
    quantity the loop computed must equal the one recomputed here from the spec, so breaking the lag ring, the
    bootstrap, ALIGN's inputs, the normalization, the anchor or the learner anchor's weight makes one differ."""
    lag, gamma, lam, tv_delta = 2, 0.99, 0.95, 0.03
    updates, env_steps = watch_training_loop(
        script, tmp_path, monkeypatch, "--policy-lag", lag, "--tv-delta", tv_delta, "--learning-rate", 2.5e-3, *flags
    )
    firsts = {u["iteration"]: u for u in updates if "agent" in u}
    T, N = firsts[1]["rewards"].shape
    assert sorted(firsts) == list(range(1, len(firsts) + 1)) and len(firsts) >= 5
    learner_logprobs, gates, bounds = {}, [], {}
    terminal_kinds = set()
    for iteration, first in firsts.items():
        pi_T, beta = first["agent"], first["behavior"]
        # the simulated lag: beta is exactly the learner of iteration max(1, T - K), critic included
        source = firsts[max(1, iteration - lag)]["agent"].state_dict()
        assert all(torch.equal(v, source[k]) for k, v in beta.state_dict().items()), iteration
        b_obs, b_actions = first["obs"].flatten(0, 1), first["actions"].flatten(0, 1)
        with torch.no_grad():
            _, beta_logprobs, _, beta_values = beta.get_action_and_value(b_obs, b_actions)
            _, lp_T, _, v_T = pi_T.get_action_and_value(b_obs, b_actions)
            v_T_next, beta_next = pi_T.get_value(first["next_obs"]), beta.get_value(first["next_obs"])
        # beta's log-probs and values are those recorded at rollout time, pi_T's those ALIGN computed. Recomputed here
        # in one batch, they round differently from the rollout's one-step passes (and on some CPUs from a pass of the
        # same shape): float32 forward passes give O(1) log-probs and values to ~1e-7 relative, checked to 1e-5
        torch.testing.assert_close(first["logprobs"].flatten(), beta_logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first["values"].flatten(), beta_values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first["b_learner_logprobs"], lp_T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first["b_learner_values"], v_T, atol=1e-5, rtol=1e-5)
        # ALIGN and FILTER are then recomputed from the loop's own log-probs and values, so that what separates the
        # two is the order of the float32 operations of each formula, not the rounding of a forward pass
        beta_logprobs, lp_T, v_T = first["logprobs"].flatten(), first["b_learner_logprobs"], first["b_learner_values"]
        if iteration > lag:
            assert (lp_T - beta_logprobs).abs().max() > 1e-3, "with lag, pi_T differs from beta"
        # the truncation bootstrap: r + gamma V_beta(final obs) on a time limit, r alone on a real terminal
        for t in range(T):
            reward, terminated, truncated, final_obs = env_steps[(iteration - 1) * T + t]
            expected = torch.as_tensor(reward, dtype=torch.float32)
            for i in np.flatnonzero(truncated & ~terminated):
                with torch.no_grad():
                    expected[i] += gamma * beta.get_value(torch.as_tensor(final_obs[i][None], dtype=torch.float32))[0]
            terminal_kinds |= {"terminated"} if terminated.any() else set()
            terminal_kinds |= {"truncated"} if (truncated & ~terminated).any() else set()
            # V_beta(final obs) recomputed for one observation: float32 rounding of an O(1) value, ~1e-7
            torch.testing.assert_close(first["rewards"][t], expected, atol=1e-5, rtol=1e-6)
            assert first["dones"][t].tolist() == (terminated | truncated).astype(float).tolist()
        # ALIGN: V-trace with pi_T and its critic, once per batch (or GAE over beta's values with --no-realign)
        rewards, dones = first["rewards"].double(), first["dones"].double()
        if "--no-realign" in flags:
            adv, ret = reference_gae(rewards, first["values"].double(), beta_next.double(), dones, gamma, lam)
        else:
            adv, ret = reference_vtrace(
                rewards.tolist(),
                v_T.view(T, N).tolist(),
                v_T_next.tolist(),
                dones.tolist(),
                (lp_T - beta_logprobs).view(T, N).tolist(),
                gamma,
                lam,
                1.0,
                1.0,
            )
        # the loop's float32 recursion against float64: ~6e-8 relative per step over T steps, on values up to ~10
        torch.testing.assert_close(first["b_advantages"].double(), adv.flatten(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(first["b_returns"].double(), ret.flatten(), atol=1e-4, rtol=1e-4)
        learner_logprobs[iteration] = (lp_T, beta_logprobs)
        # the bound of this batch: delta, or with --tv-delta-rule forward and the behavior anchor, delta + the lag
        lag_l1 = ((lp_T - beta_logprobs).exp() - 1).abs().mean().item()
        forward = "forward" in flags and "--tv-anchor" not in flags
        bounds[iteration] = tv_delta + lag_l1 if forward else tv_delta
        assert first["tv_delta"] == pytest.approx(bounds[iteration], rel=1e-5)  # a float32 mean of O(1) terms
        assert not forward or iteration <= lag or bounds[iteration] > tv_delta + 1e-3, "the lag should widen it"
    assert terminal_kinds == {"terminated", "truncated"}, "the run should see both kinds of episode end"

    # FILTER, every minibatch of every epoch: the normalized advantages against beta (or pi_T, weighted)
    for update in updates:
        first = firsts[update["iteration"]]
        lp_T, beta_logprobs = learner_logprobs[update["iteration"]]
        mb = update["mb_inds"]
        advantages = first["b_advantages"][mb]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        anchor = beta_logprobs[mb]
        if "--tv-anchor" in flags:
            anchor = lp_T[mb]
            advantages = advantages * torch.clamp((lp_T - beta_logprobs)[mb].exp(), max=1.0)  # rho_bar = 1
        loss, gate = vaco_loss(update["newlogprob"], anchor, advantages, bounds[update["iteration"]])
        # float32 means of O(1) terms (normalized advantages times ratios near 1): ~10 roundings of such a term
        assert update["pg_loss"].item() == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert update["pg_stats"]["gate"] == gate
        gates.append(gate)
        value_loss = 0.5 * ((update["newvalue"] - first["b_returns"][mb]) ** 2).mean()
        assert update["v_loss"].item() == pytest.approx(value_loss.item(), rel=1e-5)  # a float32 mean of squares
    assert set(gates) == {0.0, 1.0}, "both sides of the gate should be exercised"
