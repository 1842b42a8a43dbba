"""Tests of vaco_llm_math.py: answer extraction and reward, policy_loss on padded token tensors, the micro-batched
gradient, end-to-end runs of the script on a tiny causal LM built here (no download), measured asynchrony, bad
input, and learning on an easy synthetic setting."""
import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "vaco_llm_math.py"
sys.path.insert(0, str(ROOT))
import vaco_llm_math as llm  # noqa: E402

EOS = "<|endoftext|>"
# every key the README documents for this script
DOCUMENTED_KEYS = [
    "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl", "losses/clipfrac",
    "losses/tv", "losses/filtered_frac", "losses/filter_gate_frac", "align/tv_behavior", "charts/policy_lag",
    "charts/policy_lag_max", "charts/learning_rate", "charts/reward_mean", "charts/format_rate",
    "charts/response_length", "perf/generate_s", "perf/train_s", "perf/wait_s", "perf/step_s", "perf/tokens_per_s",
    "eval/accuracy", "eval/format_rate",
]


def build_tiny_model(path, hidden=64, chat_template=None, seed=0):
    """A 2-layer Qwen2 from a config and a byte-level BPE tokenizer trained on synthetic problems, saved to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    texts = [f"Question: {p['question']}\n{llm.INSTRUCTION}\nAnswer: {p['answer']} \\boxed{{{i}}}"
             for i, p in enumerate(llm.make_synthetic_problems(1000, 0))]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_script(cwd, *flags, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_scalars(cwd):
    (run_dir,) = (Path(cwd) / "runs").iterdir()
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return run_dir, {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
                     for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------- answers and reward


@pytest.mark.parametrize("text, answer, boxed", [
    ("so the total is \\boxed{18}.", 18.0, True),
    ("\\boxed{18.00}", 18.0, True),
    ("\\boxed{1,000}", 1000.0, True),
    ("\\boxed{\\$1,234.50}", 1234.5, True),
    ("\\boxed{-3}", -3.0, True),
    ("\\boxed{\\text{42}}", 42.0, True),  # nested braces
    ("\\boxed{{7}} apples", 7.0, True),
    ("first \\boxed{12}, then \\boxed{7}", 7.0, True),  # the last box wins
    ("2 + 3 = 5 so \\boxed{5} and 9 more words 11", 5.0, True),  # the box beats a later number
    ("The answer is 42.", 42.0, False),  # no box: the last number
    ("we get 3, 4 and 5", 5.0, False),  # a comma list is not a thousands separator
    ("it costs $1,500,000 in total", 1_500_000.0, False),
    ("\\boxed{7", 7.0, False),  # unclosed: not a box, falls back to the last number
    ("\\boxed{}", None, True),  # a box without a number
    ("I do not know", None, False),
    ("", None, False),
])
def test_extract_answer(text, answer, boxed):
    assert llm.extract_answer(text) == (answer, boxed)


@pytest.mark.parametrize("completion, gold, expected", [
    ("\\boxed{18.00}", 18.0, (1.0, 1.0)),
    ("\\boxed{1,000}", 1000.0, (1.0, 1.0)),
    ("\\boxed{-3}", -3.0, (1.0, 1.0)),
    ("\\boxed{0.5}", 0.5, (1.0, 1.0)),
    ("\\boxed{17}", 18.0, (0.0, 1.0)),
    ("\\boxed{18} wait, 17", 18.0, (1.0, 1.0)),
    ("the answer is 18", 18.0, (1.0, 0.0)),
    ("no idea", 18.0, (0.0, 0.0)),
])
def test_reward(completion, gold, expected):
    assert llm.reward_fn(completion, gold) == expected


def test_gold_answer():
    assert llm.gold_answer("She has 2 + 3 = <<2+3=5>>5.\n#### 5") == 5.0
    assert llm.gold_answer("...\n#### 1,000") == 1000.0
    assert llm.gold_answer("...\n#### -4") == -4.0
    with pytest.raises(ValueError):
        llm.gold_answer("The answer is 5")
    with pytest.raises(ValueError):
        llm.gold_answer("#### none")


def test_synthetic_problems_are_gsm8k_format_and_correct():
    problems = llm.make_synthetic_problems(300, seed=3, max_number=9)
    assert problems == llm.make_synthetic_problems(300, seed=3, max_number=9)  # seeded
    ops = set()
    for p in problems:
        expression = p["answer"].split("<<")[1].split("=")[0]  # GSM8K's calculator annotation, e.g. 3*4
        assert llm.gold_answer(p["answer"]) == eval(expression) >= 0  # the worked answer and the gold agree
        assert p["question"].endswith("?")
        ops |= set(expression) & set("+-*")
    assert ops == {"+", "-", "*"}
    assert all("*" in p["answer"] for p in llm.make_synthetic_problems(20, 0, ops="*"))


# ---------------------------------------------------------------- policy_loss on padded token tensors


def padded_batch(seed=0, lag_scale=0.3):
    """[B, L] log-probs, behavior log-probs and sequence advantages with right padding holding wild values."""
    g = torch.Generator().manual_seed(seed)
    B, L = 6, 9
    lengths = torch.tensor([9, 3, 5, 1, 7, 4])
    valid = torch.arange(L)[None, :] < lengths[:, None]
    behavior = -torch.rand(B, L, generator=g) * 3
    new = behavior + lag_scale * torch.randn(B, L, generator=g)
    new[~valid], behavior[~valid] = 50.0, -50.0  # padding: any value it leaks would dominate every statistic
    advantages = torch.randn(B, 1, generator=g).expand(B, L).clone()
    return new, behavior, advantages, valid


def reference_loss(kind, new, behavior, advantages, valid, tv_delta, clip_coef):
    """Spec sections 3 and 4 written on padded tensors with masked means, independently of policy_loss."""
    n = valid.sum()
    ratio = torch.exp((new - behavior) * valid)  # 1 on padding
    l1 = ((ratio.detach() - 1).abs() * valid).sum() / n
    if kind == "vaco":
        if l1 <= tv_delta:
            keep = valid
        else:
            keep = valid & (advantages * (ratio.detach() - 1) <= 0)
        return -(advantages * ratio * keep).sum() / n, 0.5 * l1, 1 - keep.sum() / n, float(l1 > tv_delta)
    if kind == "ppo":
        per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    else:
        per_token = -(advantages * ratio - advantages.abs() / (2 * clip_coef) * (ratio - 1) ** 2)
    return (per_token * valid).sum() / n, 0.5 * l1, 0.0, float(l1 > tv_delta)


@pytest.mark.parametrize("kind", ["vaco", "ppo", "spo"])
@pytest.mark.parametrize("lag_scale", [0.05, 0.6])  # inside and outside the trust region
def test_policy_loss_matches_reference_on_valid_tokens(kind, lag_scale):
    new, behavior, advantages, valid = padded_batch(lag_scale=lag_scale)
    new_tokens = new[valid].clone().requires_grad_(True)
    loss, stats = llm.policy_loss(kind, new_tokens, behavior[valid], advantages[valid], 0.2, 0.2)
    new_ref = new.clone().requires_grad_(True)
    ref, tv, filtered, gate = reference_loss(kind, new_ref, behavior, advantages, valid, 0.2, 0.2)
    assert torch.allclose(loss, ref, atol=1e-6)
    assert stats["tv"] == pytest.approx(float(tv), abs=1e-6)
    assert stats["filtered_frac"] == pytest.approx(float(filtered), abs=1e-6)
    assert stats["gate"] == gate
    assert gate == (lag_scale > 0.3)  # the two settings do land on both sides of the gate
    loss.backward()
    ref.backward()
    assert torch.allclose(new_tokens.grad, new_ref.grad[valid], atol=1e-6)


def test_vaco_filter_drops_exactly_the_tokens_that_move_away():
    new, behavior, advantages, valid = padded_batch(lag_scale=0.6)
    new_tokens = new[valid].clone().requires_grad_(True)
    adv, beta = advantages[valid], behavior[valid]
    loss, stats = llm.policy_loss("vaco", new_tokens, beta, adv, 0.2, 0.2)
    loss.backward()
    ratio = torch.exp(new_tokens.detach() - beta)
    moving_away = adv * (ratio - 1) > 0
    assert stats["gate"] == 1.0 and 0 < moving_away.float().mean() < 1
    assert torch.all(new_tokens.grad[moving_away] == 0)
    assert torch.all(new_tokens.grad[~moving_away & (adv != 0)] != 0)
    # every kept token's step shrinks |r - 1|: the gradient descent direction -grad pulls r toward 1
    kept = ~moving_away & (adv != 0)
    assert torch.all(torch.sign(-new_tokens.grad[kept]) == torch.sign(1 - ratio[kept]))
    # the denominator counts the dropped tokens too
    assert loss.item() == pytest.approx(-(adv * ratio * ~moving_away).sum().item() / len(adv), rel=1e-6)


def test_policy_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown policy loss"):
        llm.policy_loss("grpo", torch.zeros(3), torch.zeros(3), torch.ones(3), 0.2, 0.2)


# ---------------------------------------------------------------- model-side pieces, in process


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


def test_sampled_logprobs_match_the_learner_forward(tiny_model):
    """beta recorded while sampling with a KV cache and left padding equals the learner's one-pass log-probs."""
    model, tokenizer = load(tiny_model)
    questions = [q["question"] for q in llm.make_synthetic_problems(5, 1)] + ["Hi?"]  # very different lengths
    prompt_ids, prompt_mask = llm.encode_prompts(tokenizer, questions, "cpu")
    assert (prompt_mask == 0).any()  # left padding is exercised
    eos = torch.tensor([tokenizer.eos_token_id])
    completions, behavior, valid = llm.sample(model, prompt_ids, prompt_mask, 12, 1.0, eos, tokenizer.pad_token_id,
                                              torch.Generator().manual_seed(0))
    with torch.no_grad():
        learner, _ = llm.completion_logprobs(model, prompt_ids, prompt_mask, completions, 1.0)
    assert torch.allclose(learner[valid], behavior[valid], atol=1e-4)
    # valid tokens are a prefix that ends at (and includes) the first end-of-sequence token
    for row, ok in zip(completions, valid):
        n = int(ok.sum())
        assert ok[:n].all() and not ok[n:].any()
        ends = (row[:n] == tokenizer.eos_token_id).nonzero()
        assert len(ends) == 0 and n == completions.shape[1] or ends.flatten().tolist() == [n - 1]


def test_micro_batched_gradient_equals_the_direct_gradient(tiny_model):
    """minibatch_policy_gradient with micro-batches of 2 gives the gradient of policy_loss on the whole minibatch."""
    model, tokenizer = load(tiny_model)
    questions = [q["question"] for q in llm.make_synthetic_problems(6, 2)]
    prompt_ids, prompt_mask = llm.encode_prompts(tokenizer, questions, "cpu")
    eos = torch.tensor([tokenizer.eos_token_id])
    completions, behavior, valid = llm.sample(model, prompt_ids, prompt_mask, 10, 1.0, eos, tokenizer.pad_token_id,
                                              torch.Generator().manual_seed(1))
    behavior = behavior + 0.5 * torch.randn(behavior.shape, generator=torch.Generator().manual_seed(2))  # lagged
    advantages = torch.randn(6, 1, generator=torch.Generator().manual_seed(3)).expand_as(valid)
    args = llm.Args(policy_loss="vaco", tv_delta=0.2)

    direct_lp, _ = llm.completion_logprobs(model, prompt_ids, prompt_mask, completions, 1.0)
    direct, stats = llm.policy_loss("vaco", direct_lp[valid], behavior[valid], advantages[valid], 0.2, 0.2)
    assert stats["gate"] == 1.0 and stats["filtered_frac"] > 0  # the filter is active in this check
    direct.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    micro = [llm.trim(prompt_ids[i], prompt_mask[i], completions[i], valid[i]) for i in torch.arange(6).split(2)]
    loss, stats2, newlogprob, _ = llm.minibatch_policy_gradient(model, micro, behavior[valid], advantages[valid], args)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5) and stats2 == pytest.approx(stats)
    assert torch.allclose(newlogprob, direct_lp[valid].detach(), atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-6, rtol=1e-4), name


# ---------------------------------------------------------------- end-to-end runs


@pytest.fixture(scope="module")
def synthetic_run(tiny_model, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("synthetic")
    proc = run_script(cwd, "--model-name-or-path", str(tiny_model), "--dataset", "synthetic", "--total-steps", "6",
                      "--synthetic-max-number", "2",  # small answers: a random model hits some, so it learns
                      "--num-prompts", "8", "--group-size", "8", "--max-new-tokens", "16", "--learning-rate", "3e-3",
                      "--num-minibatches", "2", "--micro-batch-size", "16", "--eval-samples", "16",
                      "--eval-every", "3", "--policy-lag", "1", "--save-model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, scalars = read_scalars(cwd)
    return proc, run_dir, scalars


def test_synthetic_run_writes_every_documented_key(synthetic_run):
    proc, _, scalars = synthetic_run
    missing = [key for key in DOCUMENTED_KEYS if key not in scalars]
    assert not missing, f"keys not written: {missing}"
    assert [s for s, _ in scalars["charts/reward_mean"]] == list(range(1, 7))
    assert [s for s, _ in scalars["eval/accuracy"]] == [0, 3, 6]  # start, every 3 steps, end
    assert all(np.isfinite(v) for key in DOCUMENTED_KEYS for _, v in scalars[key])
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == 6  # a progress line per step


def test_async_lag_is_one_after_warm_up(synthetic_run):
    _, _, scalars = synthetic_run
    assert [v for _, v in scalars["charts/policy_lag"]] == [0, 1, 1, 1, 1, 1]
    assert sum(v for _, v in scalars["charts/reward_mean"]) > 0  # some advantages are nonzero: the weights move
    # the learner does change between versions, so a lagged batch is really off-policy
    assert all(v > 1e-3 for _, v in scalars["align/tv_behavior"][1:])


def test_generation_overlaps_training(synthetic_run):
    """Measured, not assumed: after warm-up a step takes less wall time than generating plus training it."""
    _, _, scalars = synthetic_run
    get = lambda key: np.array([v for _, v in scalars[key]][1:])  # noqa: E731
    generate, train, step = get("perf/generate_s"), get("perf/train_s"), get("perf/step_s")
    hidden = (generate + train - step).sum()  # generation time the learner did not wait for
    print(f"per step after warm-up: generate {generate.mean():.3f}s, train {train.mean():.3f}s, "
          f"wall {step.mean():.3f}s; hidden generation {hidden / generate.sum():.0%}")
    assert hidden > 0.5 * generate.sum(), (generate, train, step)


def test_saved_model_reloads(synthetic_run, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _ = synthetic_run
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert tokenizer.eos_token == EOS
    changed = [not torch.equal(a, b) for a, b in zip(saved.state_dict().values(), original.state_dict().values())]
    assert any(changed)  # the saved weights are the trained ones


def test_jsonl_dataset_with_chat_template_synchronous(tmp_path):
    """--dataset-path with a chat template and --policy-lag 0: the first minibatch of every step is on-policy."""
    template = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    model_dir = build_tiny_model(tmp_path / "chat", chat_template=template)
    records = [{"question": f"Ava has {a} coins and finds {b} more. How many coins?",
                "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b:,}"} for a, b in
               [(1, 2), (3, 4), (500, 700), (2, 2), (6, 1), (10, 990), (4, 4), (7, 8)]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run_script(tmp_path, "--model-name-or-path", str(model_dir), "--dataset-path", str(data),
                      "--total-steps", "2", "--num-prompts", "2", "--group-size", "4", "--max-new-tokens", "8",
                      "--learning-rate", "1e-2", "--num-minibatches", "2", "--eval-samples", "2",
                      "--policy-lag", "0", "--micro-batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, scalars = read_scalars(tmp_path)
    assert not [key for key in DOCUMENTED_KEYS if key not in scalars]
    assert [v for _, v in scalars["charts/policy_lag"]] == [0, 0]
    assert all(v < 1e-4 for _, v in scalars["align/tv_behavior"])  # pi_T = beta: positions and template agree
    assert "<|assistant|>" in llm.format_prompt(load(model_dir)[1], "q")  # the chat template was the one used


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    ({"group_size": 1}, "--group-size must be >= 2"),
    ({"dataset": "gsm9k"}, "unknown --dataset 'gsm9k'"),
    ({"model_name_or_path": "/nonexistent/model"}, "does not exist"),
    ({"dataset_path": "/nonexistent.jsonl"}, "is not a file"),
    ({"num_prompts": 3, "group_size": 3, "num_minibatches": 2}, "does not split"),
    ({"tv_delta": 0.0}, "--tv-delta must be > 0"),
    ({"synthetic_ops": "+/"}, "--synthetic-ops"),
])
def test_check_args_rejects_bad_input(overrides, message):
    with pytest.raises(SystemExit, match=message):
        llm.check_args(llm.Args(**overrides))


def test_model_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        llm.check_args(llm.Args(model_name_or_path=str(tmp_path)))


def test_jsonl_record_without_gold_marker_is_rejected(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n"
                    + json.dumps({"question": "2+2?", "answer": "it is 4"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: .*'####'"):
        llm.load_problems(llm.Args(dataset_path=str(data), eval_samples=0))


def test_gsm8k_is_loaded_through_datasets(monkeypatch):
    """The hub path, with `datasets` replaced by a stand-in (no network here): splits, config and gold parsing."""
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        record = lambda q, gold: {"question": q, "answer": f"work\n#### {gold}"}  # noqa: E731
        return {"train": [record("a", "1,200"), record("b", "3")], "test": [record("c", "-2"), record("d", "5")]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, evaluation = llm.load_problems(llm.Args(eval_samples=1))
    assert calls == [("openai/gsm8k", "main")]
    assert train == [("a", 1200.0), ("b", 3.0)] and evaluation == [("c", -2.0)]

    def offline(name, config):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SystemExit, match="could not load openai/gsm8k .*--dataset synthetic"):
        llm.load_problems(llm.Args())


def test_cli_error_is_one_line_and_comes_before_loading(tmp_path):
    proc = run_script(tmp_path, "--dataset", "gsm9k", "--model-name-or-path", "/nonexistent/model", timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: unknown --dataset 'gsm9k'; use openai/gsm8k, synthetic, or --dataset-path FILE.jsonl"]
    assert "transformers" not in proc.stderr and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- learning


def warm_up_format(path, steps=60, seed=0, digits=(0, 1, 2)):
    """Supervised warm-up that teaches only the answer format: ` \\boxed{d}` with d drawn at random from digits,
    whatever the question, so the model knows where an answer goes but not which one: RL has to find it."""
    model, tokenizer = load(path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    problems = llm.make_synthetic_problems(32 * steps, seed, max_number=1)
    for step in range(steps):
        texts = [llm.format_prompt(tokenizer, p["question"]) + f" \\boxed{{{rng.choice(digits)}}}" + EOS
                 for p in problems[32 * step : 32 * (step + 1)]]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels[:, :-6] = -100  # only the answer: ` \boxed{d}` and the end-of-sequence token
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        loss = model(**enc, position_ids=position_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)


def test_rl_raises_reward_on_easy_synthetic_problems(tmp_path):
    """The easiest synthetic setting (1 + 1, names and items varying): after a format-only warm-up the model guesses
    a digit (~10% right); VACO with lag 1 has to find the answer from the reward alone. (Problems whose answer
    depends on the question, e.g. --synthetic-ops +-*, were not learnt reliably by this tiny model within a CPU
    minute, so this test does not claim that.)"""
    torch.set_num_threads(1)
    model_dir = build_tiny_model(tmp_path / "model", hidden=64)
    warm_up_format(model_dir, digits=tuple(range(10)))
    proc = run_script(tmp_path, "--model-name-or-path", str(model_dir), "--dataset", "synthetic",
                      "--synthetic-max-number", "1", "--synthetic-ops", "+", "--total-steps", "25", "--num-prompts",
                      "8", "--group-size", "16", "--max-new-tokens", "8", "--learning-rate", "1e-3",
                      "--update-epochs", "2", "--num-minibatches", "4", "--micro-batch-size", "64",
                      "--eval-samples", "32", "--eval-every", "0", "--policy-lag", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, scalars = read_scalars(tmp_path)
    rewards = [v for _, v in scalars["charts/reward_mean"]]
    before, after = np.mean(rewards[:2]), np.mean(rewards[-5:])  # steps 1 and 2 are sampled before any update
    accuracy = [v for _, v in scalars["eval/accuracy"]]
    print(f"sampled reward {before:.3f} -> {after:.3f}, greedy accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}")
    assert before < 0.5
    assert after > max(0.6, before + 0.25)
    assert accuracy[-1] >= 0.9
