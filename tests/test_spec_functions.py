"""compute_vtrace and policy_loss of every script against independent references written from the spec.

The scripts share no code on purpose, so each one's copy is tested, and the copies must stay textually identical.
"""
import importlib
import inspect
import math
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT))
SCRIPTS_WITH_A_CRITIC = ["vaco_classic", "vaco_atari", "vaco_async_mp"]
ALL_SCRIPTS = SCRIPTS_WITH_A_CRITIC + ["vaco_llm_math"]  # GRPO-style: policy_loss only


@pytest.fixture(params=SCRIPTS_WITH_A_CRITIC)
def compute_vtrace(request):
    return importlib.import_module(request.param).compute_vtrace


@pytest.fixture(params=ALL_SCRIPTS)
def policy_loss(request):
    return importlib.import_module(request.param).policy_loss


@pytest.mark.parametrize("function,scripts", [("compute_vtrace", SCRIPTS_WITH_A_CRITIC), ("policy_loss", ALL_SCRIPTS),
                                              ("adapt_kl_coef", ALL_SCRIPTS)])
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
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)


def test_vtrace_without_lag_is_gae(compute_vtrace):
    b = random_batch(seed=3)
    b["log_rhos"] = torch.zeros_like(b["log_rhos"])
    adv, ret = compute_vtrace(**b, gamma=0.99, gae_lambda=0.95, rho_bar=1.0, c_bar=1.0)
    gae_adv, gae_ret = reference_gae(b["rewards"], b["values"], b["bootstrap_value"], b["dones"], 0.99, 0.95)
    torch.testing.assert_close(adv, gae_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, gae_ret, rtol=1e-12, atol=1e-12)


def test_vtrace_lambda_one_is_impala_advantage(compute_vtrace):
    b = random_batch(seed=4)
    gamma = 0.9
    adv, ret = compute_vtrace(**b, gamma=gamma, gae_lambda=1.0, rho_bar=1.0, c_bar=1.0)
    next_vs = torch.cat([ret[1:], b["bootstrap_value"][None]])  # v_{t+1}; past the last step v_T = V(s_T)
    impala = b["rewards"] + gamma * (1 - b["dones"]) * next_vs - b["values"]
    torch.testing.assert_close(adv, impala, rtol=1e-12, atol=1e-12)


def test_vtrace_ignores_what_follows_a_done(compute_vtrace):
    b = random_batch(T=4, N=1, seed=5, done_prob=0.0)
    b["dones"][1, 0] = 1.0
    adv, ret = compute_vtrace(**b, gamma=0.99, gae_lambda=0.95, rho_bar=1.0, c_bar=1.0)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["rewards"][2:] += 100.0
    b2["bootstrap_value"] += 100.0
    adv2, ret2 = compute_vtrace(**b2, gamma=0.99, gae_lambda=0.95, rho_bar=1.0, c_bar=1.0)
    torch.testing.assert_close(adv[:2], adv2[:2])
    torch.testing.assert_close(ret[:2], ret2[:2])
    assert not torch.allclose(adv[2:], adv2[2:])


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
    torch.testing.assert_close(loss, -(adv * ratio).mean())
    assert stats == pytest.approx({"tv": 0.5 * l1, "filtered_frac": 0.0, "gate": 0.0})


def test_vaco_drops_exactly_the_samples_that_push_away_outside_the_trust_region(policy_loss):
    new, behavior, adv = minibatch(lag=0.5)
    ratio = (new - behavior).exp()
    l1 = (ratio - 1).abs().mean().item()
    loss, stats = policy_loss("vaco", new, behavior, adv, tv_delta=l1 - 1e-3, clip_coef=0.2, kl_coef=0.1)
    pushes_away = [a * (r - 1) > 0 for a, r in zip(adv.tolist(), ratio.tolist())]
    kept = [not p for p in pushes_away]
    expected = -sum(a * r for a, r, k in zip(adv.tolist(), ratio.tolist(), kept) if k) / len(kept)
    assert 0 < sum(pushes_away) < len(kept)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats == pytest.approx({"tv": 0.5 * l1, "filtered_frac": sum(pushes_away) / len(kept), "gate": 1.0})

    # the gradient is -mean(m * A * grad r), with grad_logp r = r: zero on the dropped samples
    loss.backward()
    expected_grad = torch.tensor([-a * r * k / len(kept) for a, r, k in zip(adv.tolist(), ratio.tolist(), kept)],
                                 dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_vaco_gradient_step_never_increases_distance_of_kept_samples(policy_loss):
    new, behavior, adv = minibatch(lag=0.5, seed=7)
    loss, stats = policy_loss("vaco", new, behavior, adv, tv_delta=0.01, clip_coef=0.2, kl_coef=0.1)
    loss.backward()
    assert stats["gate"] == 1.0
    with torch.no_grad():
        before = ((new - behavior).exp() - 1).abs()
        after = ((new - 1e-3 * new.grad - behavior).exp() - 1).abs()
    assert bool((after <= before + 1e-12).all())


def test_ppo_matches_clipped_surrogate(policy_loss):
    new, behavior, adv = minibatch(lag=0.4, seed=1)
    loss, stats = policy_loss("ppo", new, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=0.1)
    terms = []
    for a, r in zip(adv.tolist(), (new - behavior).exp().tolist()):
        terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert stats["filtered_frac"] == 0.0


def test_spo_matches_its_penalized_objective(policy_loss):
    new, behavior, adv = minibatch(lag=0.4, seed=2)
    eps = 0.3
    loss, _ = policy_loss("spo", new, behavior, adv, tv_delta=0.2, clip_coef=eps, kl_coef=0.1)
    terms = [a * r - abs(a) / (2 * eps) * (r - 1) ** 2 for a, r in zip(adv.tolist(), (new - behavior).exp().tolist())]
    assert loss.item() == pytest.approx(-sum(terms) / len(terms), rel=1e-12)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1, 1.0])
def test_ppo_kl_matches_its_penalized_objective_and_gradient(policy_loss, kl_coef):
    new, behavior, adv = minibatch(lag=0.4, seed=3)
    loss, stats = policy_loss("ppo-kl", new, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=kl_coef)
    ratios, n = (new - behavior).exp().tolist(), len(adv)
    # the penalty is the sample estimate of KL(beta || pi_theta): r - 1 - log r, with log r = new - behavior
    terms = [-a * r + kl_coef * (r - 1 - math.log(r)) for a, r in zip(adv.tolist(), ratios)]
    assert loss.item() == pytest.approx(sum(terms) / n, rel=1e-12)
    assert stats["filtered_frac"] == 0.0
    loss.backward()  # d/dlogp of -A r + c (r - 1 - log r) = -A r + c (r - 1)
    expected_grad = torch.tensor([(-a * r + kl_coef * (r - 1)) / n for a, r in zip(adv.tolist(), ratios)],
                                 dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("script", ALL_SCRIPTS)
@pytest.mark.parametrize("kl,target,expected", [
    (0.0151, 0.01, 0.2), (0.0149, 0.01, 0.1), (0.01, 0.01, 0.1), (0.0067, 0.01, 0.1), (0.0066, 0.01, 0.05),
    (1.0, 0.0, 0.1), (0.0, 0.0, 0.1),  # target 0: a fixed coefficient
])
def test_adaptive_kl_coef_doubles_above_one_and_a_half_targets_and_halves_below_two_thirds(script, kl, target,
                                                                                         expected):
    adapt_kl_coef = importlib.import_module(script).adapt_kl_coef
    assert adapt_kl_coef(0.1, kl, target) == pytest.approx(expected)


def test_all_losses_equal_the_policy_gradient_on_policy(policy_loss):
    """With pi_theta = beta (first minibatch, no lag) the four losses and their gradients coincide."""
    new, behavior, adv = minibatch(lag=0.0)
    grads = []
    for kind in ["vaco", "ppo", "spo", "ppo-kl"]:
        x = new.detach().clone().requires_grad_(True)
        loss, stats = policy_loss(kind, x, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=0.1)
        loss.backward()
        assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
        assert stats["tv"] == 0.0 and stats["gate"] == 0.0
        grads.append(x.grad)
    for grad in grads[1:]:
        torch.testing.assert_close(grads[0], grad)


def test_unknown_policy_loss_is_refused(policy_loss):
    new, behavior, adv = minibatch()
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss("trpo", new, behavior, adv, tv_delta=0.2, clip_coef=0.2, kl_coef=0.1)

