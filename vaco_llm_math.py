# VACO for a small LLM on math word problems (GSM8K by default), with asynchronous generation.
# Paper: "Align and Filter: Improving Performance in Asynchronous On-Policy RL", arXiv 2603.01365.
# GRPO-style: no critic, so nothing for V-trace to realign; this is FILTER only (README: the vaco_llm_math.py
# section). A generator thread with its own copy of the weights samples the batches of future steps while the learner
# trains, so each batch is --policy-lag versions old; every minibatch drops, outside the TV trust region, the tokens
# that would push the policy further from the generator's. Weights and optimizer state are fp32; --dtype is the
# compute precision.
import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import queue
import random
import re
import signal
import sys
import threading
import time
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torch.utils.tensorboard import SummaryWriter

# How this script works, beyond the algorithm (the README's vaco_llm_math.py section keeps the short version; the
# measurements behind these choices are on tests/results/README.md, the LLM sections).
#
# Numerics. The model is always loaded in fp32: the learner's weights and AdamW's state are fp32 master copies, since
# AdamW steps of 1e-6..1e-5 round to zero on bf16 weights. --dtype sets the compute precision of sampling and of the
# learner's forward pass: float32 (default) or bfloat16, which is torch.autocast over the fp32 weights, on CUDA and CPU
# alike. --save-model writes the fp32 weights.
# At lag 0, pi_T / beta is 1 only up to a numerical floor (sampling and the learner run different kernels and shapes),
# and the filter reads that floor as lag, so it must stay far below delta. Mind the units: delta bounds the L1
# quantity mean|r - 1| of a minibatch, while the logged losses/tv and align/tv_behavior are TV = 0.5 * mean|r - 1|.
# fp32's floor is far below delta; bf16's is over half of delta = 0.05. The script reports its lag-0 floor in L1 units
# beside delta at step 1 and warns above delta / 10.
#
# Asynchrony. A generator thread (generator_thread) with its own fp32 copy of the weights samples the batches of
# future steps through a queue of at most K batches (--policy-lag K, default 1) and loads each version the learner
# publishes; the batch of step T is sampled with version T - 1 - K exactly, so charts/policy_lag is K after warm-up.
# With K = 0 the thread waits for the newest weights: synchronous. perf/generate_s, perf/train_s and perf/wait_s show
# how much generation the learner did not wait for.
#
# Sampling (sample) uses its own loop, not generate, so that beta is recorded exactly as sampled
# (log_softmax(logits / temperature)) with the learner's positions; at lag 0, pi_T = beta up to rounding (tested).
# In fp32 it decodes with a static KV cache, and with --compile-decode on CUDA the one-token decode step is compiled
# (torch.compile, CUDA graphs; on CUDA prompts are left-padded to a multiple of 64 columns so that it sees few shapes).
# Under bf16 autocast it uses a dynamic cache, uncompiled (the rotary keys come out fp32 and the values bf16, which a
# static cache cannot hold). There is no host synchronization per token: whether every row has ended is checked every
# 16 tokens. A test checks that this sampler gives the same tokens and log-probs as a plain loop with a full forward
# pass per token. perf/generate_tokens_per_s = generated tokens / perf/generate_s.
#
# Micro-batching and memory (minibatch_policy_gradient, head_logprobs). The gate needs pi_theta on the whole minibatch
# first, so a no-grad pass computes the token log-probs and the loss's gradient with respect to them, then each
# micro-batch backpropagates its share: the exact minibatch gradient in bounded memory (tested against the direct
# one). The log-probs and entropies come from the last hidden states LOGIT_CHUNK = 128 tokens at a time: the
# vocabulary-wide logits exist, in fp32, for one chunk at a time, and with gradients each chunk is recomputed in the
# backward pass instead of kept, so the vocabulary's cost does not grow with the micro-batch. With
# --gradient-checkpointing (the default) the decoder layers' activations are recomputed in the backward pass too,
# and only each layer's input is kept. Gradients are freed after each optimizer step and each weight snapshot once
# the generator has loaded it (none is made that it would not load); on glibc, tensors of 1 MB or more are returned
# to the system when freed (main).
#
# Reward (reward_fn): 1 if the answer (the last \boxed{...}, nested braces allowed, else the last number) equals the
# gold number after #### numerically (18.00 = 18, 1,000 = 1000). charts/format_rate is logged apart: since the reward
# accepts the last number, a model can drop the box as it learns. Read eval/accuracy, not the format rate.
#
# Data (load_problems): openai/gsm8k (main), --dataset-path FILE.jsonl of {"question", "answer"} records, or
# --dataset synthetic (a seeded generator of GSM8K-format word problems in this file, so it runs offline).
# --eval-samples held-out problems are scored greedily at the start, every --eval-every steps and at the end
# (eval/accuracy, eval/format_rate).
#
# Errors: whatever fails, in the learner or in the generator thread, the generator thread is stopped and joined, the
# logs are closed, and the run ends with one line (error: stopped at step 12: OutOfMemoryError: CUDA out of memory.
# ...; lower --micro-batch-size or --generation-batch-size). Ctrl-C (or SIGTERM) finishes the current step, saves the
# model if asked, closes the logs and exits with 130; a second Ctrl-C aborts.
#
# Our reading, beyond the paper's: the filter works per token (the gate over the minibatch's valid tokens, dropped
# tokens stay in the denominator: a token-level mean as in DAPO); no KL penalty to a reference model (ppo-kl penalizes
# KL(beta || pi_theta), the distance to the behavior policy); no entropy bonus. AdamW, lr 1e-6, no weight decay.


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
    save_model: bool = False
    """whether to save the final fp32 model and tokenizer (`save_pretrained`) to `runs/{run_name}/model`"""

    # Model and data
    model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """a Hugging Face hub id or a local model folder, loaded in fp32 (the master weights)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """compute precision of sampling and of the learner's forward pass: bfloat16 is autocast over the fp32 weights
    (faster on big models, but its lag-0 floor, L1 mean|pi_T/beta - 1|, is over half the default --tv-delta)"""
    compile_decode: bool = False
    """on CUDA in float32: compile sampling's one-token decode step (CUDA graphs); opt-in until it has run on a GPU"""
    gradient_checkpointing: bool = True
    """recompute each layer's activations in the learner's backward pass instead of keeping them: far less memory
    for one more forward pass (--no-gradient-checkpointing keeps them)"""
    dataset: str = "openai/gsm8k"
    """`openai/gsm8k` (config `main`: train split for RL, test split for evaluation) or `synthetic` (offline)"""
    dataset_path: str | None = None
    """a JSONL file of GSM8K records {"question", "answer"} (overrides --dataset; the last --eval-samples held out)"""
    synthetic_max_number: int = 20
    """--dataset synthetic: operands are drawn from 1..N"""
    synthetic_ops: str = "+-*"
    """--dataset synthetic: the operations its word problems use, a subset of `+-*`"""

    # rollouts and optimization
    total_steps: int = 200
    """the number of learner steps (one batch of rollouts each)"""
    learning_rate: float = 1e-6
    """the learning rate of the AdamW optimizer"""
    num_prompts: int = 16
    """the number of prompts per batch"""
    group_size: int = 8
    """the number of sampled completions per prompt (G of GRPO)"""
    max_new_tokens: int = 512
    """the maximum length of a completion"""
    temperature: float = 1.0
    """the sampling temperature (the learner's log-probs use the same one)"""
    generation_batch_size: int = 64
    """sequences sampled in one forward batch (rollouts and evaluation)"""
    num_minibatches: int = 2
    """the number of mini-batches (of sequences) per epoch"""
    update_epochs: int = 1
    """passes over each batch"""
    micro_batch_size: int = 8
    """sequences per forward/backward pass; gradients accumulate over a minibatch (lower it to fit memory)"""
    max_grad_norm: float = 1.0
    """the global gradient norm is clipped to this"""

    # VACO
    policy_loss: Literal["vaco", "ppo", "spo", "ppo-kl"] = "vaco"
    """the policy loss: `vaco` (TV filter), or the `ppo` (clipped, token-level GRPO), `spo` and `ppo-kl` baselines"""
    tv_delta: float = 0.05
    """FILTER: bound on a minibatch's sampled L1 mean|pi/beta - 1| (2x the logged TV); 0.05 from this script's sweep"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient of `ppo`, and the penalty scale of `spo`"""
    kl_coef: float = 0.1
    """`ppo-kl`: the coefficient of its KL(beta || pi_theta) penalty"""
    kl_target: float = 0.0
    """`ppo-kl`: after each step, double or halve --kl-coef toward this mean KL (PPO's rule; 0: fixed)"""
    policy_lag: int = 1
    """K: a generator thread samples the batch of each step with weights K learner steps old (0: synchronous)"""

    # Evaluation
    eval_samples: int = 200
    """held-out problems scored with greedy decoding (0 to skip evaluation)"""
    eval_every: int = 20
    """evaluate every this many steps (and at the start and the end; 0: only at the start and the end)"""


# Answers: the last \boxed{...}, else the last number; compared numerically with the gold number.
NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def parse_number(text):
    """The last number in `text` as a float (thousands separators and `$` allowed), or None."""
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000 -> 1000, but "3, 4" stays a list
    matches = NUMBER.findall(text.replace("$", ""))
    return float(matches[-1]) if matches else None


def last_boxed(text):
    """The content of the last \\boxed{...} (nested braces allowed), or None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    begin = start + len("\\boxed{") - 1  # the opening brace
    depth = 0
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin + 1 : i]
    return None  # unclosed


def extract_answer(text):
    """(answer as a float or None, whether a closed \\boxed{} was present)."""
    boxed = last_boxed(text)
    return parse_number(boxed if boxed is not None else text), boxed is not None


def gold_answer(answer):
    """The gold number of a GSM8K answer, written after `####`."""
    value = parse_number(answer.split("####")[-1]) if "####" in answer else None
    if value is None:
        raise ValueError("no number after '####'")
    return value


def reward_fn(completion, gold):
    """(reward 1.0 if the answer equals the gold number numerically else 0.0, format: a \\boxed{} was present)."""
    answer, boxed = extract_answer(completion)
    correct = answer is not None and abs(answer - gold) <= 1e-6 * max(1.0, abs(gold))
    return float(correct), float(boxed)


SYNTHETIC_TRAIN_SIZE = 10_000  # --dataset synthetic: the problems a batch's prompts are drawn from


def make_synthetic_problems(n, seed, max_number=20, ops="+-*"):
    """GSM8K-format arithmetic word problems: one operation on two numbers, with the worked answer."""
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Mia", "Leo", "Zoe", "Sam"]
    items = ["apples", "books", "coins", "pens", "cards"]
    problems = []
    for _ in range(n):
        name, item, op = rng.choice(names), rng.choice(items), rng.choice(ops)
        a, b = rng.randint(1, max_number), rng.randint(1, max_number)  # the two operands
        if op == "+":
            question = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
            answer = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}"
        elif op == "-":
            a, b = max(a, b), min(a, b)
            question = f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have left?"
            answer = f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} left.\n#### {a - b}"
        else:
            question = f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have?"
            answer = f"{name} has {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}.\n#### {a * b}"
        problems.append({"question": question, "answer": answer})
    return problems


def to_pairs(records):
    """(question, gold number) of each GSM8K-format record."""
    return [(record["question"], gold_answer(record["answer"])) for record in records]


def read_jsonl(path):
    """(question, gold number) of each record of a JSONL file of GSM8K records; a bad record stops the run."""
    problems = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                problems += to_pairs([json.loads(line)])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise SystemExit(
                    f"error: {path}:{line_number}: not a GSM8K record "
                    f'{{"question", "answer"}} with the gold after \'####\' ({e!r})'
                ) from None
    return problems


def load_problems(args):
    """(train, held-out) lists of (question, gold number), enough for --num-prompts and --eval-samples; whatever
    is missing stops the run before the model loads."""
    if args.dataset_path is not None:
        problems = read_jsonl(args.dataset_path)
        if len(problems) < args.eval_samples + args.num_prompts:
            raise SystemExit(
                f"error: {args.dataset_path} has {len(problems)} records; it needs at least "
                f"--eval-samples (held out) + --num-prompts = {args.eval_samples + args.num_prompts}"
            )
        return problems[: len(problems) - args.eval_samples], problems[len(problems) - args.eval_samples :]
    if args.dataset == "synthetic":
        train_size = max(SYNTHETIC_TRAIN_SIZE, args.num_prompts)  # the first 10,000 whatever --num-prompts
        train = make_synthetic_problems(train_size, args.seed, args.synthetic_max_number, args.synthetic_ops)
        held_out = make_synthetic_problems(
            args.eval_samples, args.seed + 10_000, args.synthetic_max_number, args.synthetic_ops
        )
        return to_pairs(train), to_pairs(held_out)
    import datasets  # only here: it is slow to import and offline runs do not need it

    try:
        data = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:
        raise SystemExit(
            f"error: could not load openai/gsm8k ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "offline, use --dataset synthetic or --dataset-path FILE.jsonl"
        ) from None
    if len(data["train"]) < args.num_prompts or len(data["test"]) < args.eval_samples:
        raise SystemExit(
            f"error: --num-prompts and --eval-samples must be at most the {len(data['train'])} training and "
            f"{len(data['test'])} test problems of openai/gsm8k (got {args.num_prompts} and {args.eval_samples})"
        )
    return to_pairs(data["train"]), to_pairs(data["test"])[: args.eval_samples]


def format_prompt(tokenizer, question):
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\n{INSTRUCTION}\nAnswer:"


def encode_prompts(tokenizer, questions, device):
    """Prompt ids and mask, left-padded so that every completion starts at the same column (on CUDA to a multiple
    of 64 columns, so that the compiled decode step sees few shapes)."""
    enc = tokenizer(
        [format_prompt(tokenizer, q) for q in questions],
        return_tensors="pt",
        padding=True,
        pad_to_multiple_of=64 if torch.device(device).type == "cuda" else None,
        add_special_tokens=not tokenizer.chat_template,
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_ids, pad_id, sampling_rng=None, compile=False):
    """Sample completions, recording the log-prob of each sampled token under the sampling distribution (beta);
    sampling_rng (a torch.Generator) or None to decode greedily. No host synchronization but one check every 16 tokens
    whether every row has ended; in fp32 a static KV cache, and with compile=True on CUDA the one-token decode step
    compiled. Returns completions, their log-probs and the mask of valid tokens (up to and including the first
    end-of-sequence token), each [B, max_new_tokens]."""
    from transformers import DynamicCache, StaticCache

    batch, width = prompt_ids.shape
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=-1)  # causality hides the rest
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    static = not torch.is_autocast_enabled(prompt_ids.device.type)  # bf16 autocast: fp32 keys (rotated), bf16 values
    cache = StaticCache(model.config, width + max_new_tokens) if static else DynamicCache(config=model.config)
    compiled = compile and static and prompt_ids.device.type == "cuda"
    decode = model.get_compiled_call(None) if compiled else model  # the one-token step
    tokens = torch.full((batch, max_new_tokens), pad_id, device=prompt_ids.device)
    logprobs = torch.zeros(tokens.shape, device=prompt_ids.device)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    # the first forward pass reads the prompt, uncompiled (its width varies); then one token at a time
    ids, ids_positions, forward = prompt_ids, positions[:, :width], model
    for t in range(max_new_tokens):
        logits = forward(
            input_ids=ids, attention_mask=mask, position_ids=ids_positions, past_key_values=cache, logits_to_keep=1
        ).logits[:, -1]
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        if sampling_rng is None:
            token = logp.argmax(-1)
        else:  # diverged weights give NaN log-probs: sample anyway, the learner's check then stops the run
            probs = logp.exp().nan_to_num(1.0)
            token = torch.multinomial(probs, 1, generator=sampling_rng)[:, 0]
        tokens[:, t] = token.masked_fill(done, pad_id)
        logprobs[:, t] = logp.gather(-1, token[:, None])[:, 0]
        valid[:, t] = ~done
        done = done | torch.isin(token, eos_ids)
        if t % 16 == 15 and done.all():  # the only host synchronization
            break
        ids, ids_positions, forward = tokens[:, t : t + 1], positions[:, width + t : width + t + 1], decode
    return tokens, logprobs, valid


LOGIT_CHUNK = 128  # tokens whose vocabulary-wide logits exist at once in the learner


def compute_precision(device, dtype):
    """The context of --dtype's compute: bf16 autocast over the fp32 weights, or fp32 as they are."""
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16")


def head_logprobs(head, hidden, tokens, temperature):
    """Log-probs of `tokens` and the entropies, from the last hidden states, with the logits upcast to fp32."""
    logits = head(hidden).float() / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logits.gather(-1, tokens[:, None])[:, 0] - log_norm, entropy


def completion_logprobs(model, prompt_ids, prompt_mask, completions, valid, temperature):
    """log pi(y_t | x, y_<t) and the entropy of the valid completion tokens, 1-D in row-major order, in one forward
    pass with the same positions as sampling, so pi_T = beta up to rounding. The vocabulary-wide logits exist for
    LOGIT_CHUNK tokens at a time; with gradients each chunk is recomputed in the backward pass, not kept."""
    mask = torch.cat([prompt_mask, torch.ones_like(completions)], dim=-1)
    hidden = model.base_model(
        input_ids=torch.cat([prompt_ids, completions], dim=-1),
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=False,
    ).last_hidden_state
    hidden = hidden[:, prompt_ids.shape[1] - 1 : -1][valid]  # the states that predict the valid completion tokens
    chunks = [
        checkpoint(head_logprobs, model.get_output_embeddings(), h, y, temperature, use_reentrant=False)
        for h, y in zip(hidden.split(LOGIT_CHUNK), completions[valid].split(LOGIT_CHUNK))
    ]
    return tuple(torch.cat(part) for part in zip(*chunks))  # log-probs, entropies


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


def trim(prompt_ids, prompt_mask, completions, valid):
    """Drop the columns that are padding in every row of a micro-batch (left of the prompts, right of the
    completions); positions and valid tokens are unchanged."""
    first = int(prompt_mask.any(0).nonzero()[0])
    last = max(1, int(valid.sum(1).max()))
    return prompt_ids[:, first:], prompt_mask[:, first:], completions[:, :last], valid[:, :last]


def minibatch_policy_gradient(model, micro_batches, behavior_logprob, advantages, args, kl_coef):
    """Accumulate into the model's .grad the exact gradient of policy_loss on one minibatch, in bounded memory: the
    gate needs pi_theta on the whole minibatch first, so a no-grad pass computes the token log-probs and the loss's
    gradient with respect to them, then each micro-batch backpropagates its share. micro_batches holds (prompt_ids,
    prompt_mask, completions, valid); behavior_logprob and advantages are 1-D over the valid tokens, in micro-batch
    then row-major order. Returns (pg_loss, stats, log pi_theta, entropy), the last two before this update."""
    with torch.no_grad(), compute_precision(model.device, args.dtype):
        parts = [completion_logprobs(model, *micro_batch, args.temperature) for micro_batch in micro_batches]
    newlogprob, entropy = (torch.cat(part) for part in zip(*parts))
    newlogprob.requires_grad_(True)
    pg_loss, pg_stats = policy_loss(
        args.policy_loss, newlogprob, behavior_logprob, advantages, args.tv_delta, args.clip_coef, kl_coef
    )
    (token_grad,) = torch.autograd.grad(pg_loss, newlogprob)
    for micro_batch, grad in zip(micro_batches, token_grad.split([len(logprob) for logprob, _ in parts])):
        with compute_precision(model.device, args.dtype):
            logprob = completion_logprobs(model, *micro_batch, args.temperature)[0]
        (logprob * grad).sum().backward()
    return pg_loss.detach(), pg_stats, newlogprob.detach(), entropy


def update(model, optimizer, batch, args, kl_coef, shuffle_rng):
    """One learner step: GRPO advantages (the reward standardized within each group of completions of one prompt),
    then --update-epochs passes of --num-minibatches policy-gradient steps, each against the behavior log-probs
    recorded while sampling. Returns the mean over the minibatches of each logged statistic."""
    rewards = batch["reward"].view(-1, args.group_size)
    seq_advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    b_prompt_ids, b_prompt_mask, b_completions, b_valid, b_logprobs = (
        batch[key].to(model.device) for key in ("prompt_ids", "prompt_mask", "completions", "valid", "behavior_logprob")
    )  # b_logprobs: log beta(y_t)
    b_advantages = seq_advantages.reshape(-1, 1).to(model.device).expand_as(b_valid)
    batch_size = len(b_valid)
    minibatch_size = batch_size // args.num_minibatches
    minibatch_stats = []
    for epoch in range(args.update_epochs):
        b_inds = torch.randperm(batch_size, generator=shuffle_rng).to(model.device)
        for start in range(0, batch_size, minibatch_size):
            mb_inds = b_inds[start : start + minibatch_size]
            micro_batches = [
                trim(b_prompt_ids[inds], b_prompt_mask[inds], b_completions[inds], b_valid[inds])
                for inds in mb_inds.split(args.micro_batch_size)
            ]
            mb_valid = b_valid[mb_inds]  # 1-D token tensors from here on: padding never enters the loss
            mb_logprobs = b_logprobs[mb_inds][mb_valid]
            mb_advantages = b_advantages[mb_inds][mb_valid]

            pg_loss, pg_stats, newlogprob, entropy = minibatch_policy_gradient(
                model, micro_batches, mb_logprobs, mb_advantages, args, kl_coef
            )
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()  # frees the gradients until the next minibatch's backward pass

            logratio = newlogprob - mb_logprobs  # http://joschu.net/blog/kl-approx.html, against the behavior policy
            minibatch_stats.append(
                {
                    "losses/policy_loss": pg_loss.item(),
                    "losses/entropy": entropy.mean().item(),
                    "losses/old_approx_kl": (-logratio).mean().item(),
                    "losses/approx_kl": ((logratio.exp() - 1) - logratio).mean().item(),
                    "losses/clipfrac": ((logratio.exp() - 1).abs() > args.clip_coef).float().mean().item(),
                    "losses/tv": pg_stats["tv"],
                    "losses/filtered_frac": pg_stats["filtered_frac"],
                    "losses/filter_gate_frac": pg_stats["gate"],
                }
            )
    logged = {key: np.mean([stats[key] for stats in minibatch_stats]) for key in minibatch_stats[0]}
    return logged | {"align/tv_behavior": minibatch_stats[0]["losses/tv"]}  # first minibatch: pi_theta is still pi_T


def rollout(model, tokenizer, problems, args, eos_ids, sampling_rng=None):
    """Sample (or, with sampling_rng=None, decode greedily) one completion per problem, --generation-batch-size
    sequences at a time in the --dtype compute precision; returns a batch on the CPU with rewards and format flags."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [question for question, _ in problems], eos_ids.device)
    pad_id = tokenizer.pad_token_id
    size = args.generation_batch_size
    with compute_precision(eos_ids.device, args.dtype):
        parts = [
            sample(model, ids, mask, args.max_new_tokens, args.temperature, eos_ids, pad_id, sampling_rng, args.compile_decode)
            for ids, mask in zip(prompt_ids.split(size), prompt_mask.split(size))
        ]
    completions, logprobs, valid = (torch.cat(part).cpu() for part in zip(*parts))
    texts = tokenizer.batch_decode(completions.masked_fill(~valid, pad_id), skip_special_tokens=True)
    scores = torch.tensor([reward_fn(text, gold) for text, (_, gold) in zip(texts, problems)])
    return {
        "prompt_ids": prompt_ids.cpu(),
        "prompt_mask": prompt_mask.cpu(),
        "completions": completions,
        "behavior_logprob": logprobs,
        "valid": valid,
        "reward": scores[:, 0],
        "format": scores[:, 1],
        "text": texts,
    }


def make_batch(model, version, tokenizer, problems, args, eos_ids, problem_rng, sampling_rng):
    """The rollouts of one learner step, sampled with the weights of `version`: --num-prompts problems x
    --group-size samples (group members adjacent)."""
    start_time = time.time()
    chosen = [problems[i] for i in problem_rng.choice(len(problems), args.num_prompts, replace=False)]
    grouped = [problem for problem in chosen for _ in range(args.group_size)]
    batch = rollout(model, tokenizer, grouped, args, eos_ids, sampling_rng)
    return batch | {"version": version, "generate_s": time.time() - start_time}


def generator_thread(model, weight_queue, batch_queue, stop, produce, args, num_threads):
    """Produce the batch of every step T with the weights of version T - 1 - K (the learner's version at the
    start of step T is T - 1), loading each new version the learner publishes after its steps; K = 0 waits for
    the newest weights: synchronous. `stop` (or None in place of weights) ends it."""
    if model.device.type == "cpu":
        torch.set_num_threads(num_threads)  # intra-op threads are set per thread; see main
    stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            version = 0
            for step in range(1, args.total_steps + 1):
                while version < step - 1 - args.policy_lag:
                    item = weight_queue.get()
                    if item is None:
                        return
                    version, weights = item
                    model.load_state_dict(weights)
                    if stream is not None:  # finish copying before the snapshot is released
                        stream.synchronize()
                    del item, weights  # the snapshot's memory goes back now, not at the next version
                if stop.is_set():
                    return
                batch_queue.put(produce(model, version))
    except BaseException as e:  # the learner re-raises it
        batch_queue.put(e)


def check_args(args):
    """Every flag's range, before anything is loaded or written: one line that names the flag, else nothing."""
    given = {name.replace("_", "-"): value for name, value in vars(args).items()}  # flag -> its value
    batch = args.num_prompts * args.group_size
    counts = "total-steps num-prompts max-new-tokens generation-batch-size num-minibatches update-epochs micro-batch-size"
    model_folder = os.path.exists(args.model_name_or_path) or args.model_name_or_path.startswith(("/", ".", "~"))
    rules = [(f, np.isfinite(value), "a finite number") for f, value in given.items() if isinstance(value, float)]
    rules += [(f, given[f] >= 1, ">= 1") for f in (counts + " synthetic-max-number").split()]
    rules += [(f, given[f] > 0, "> 0") for f in "learning-rate temperature max-grad-norm tv-delta clip-coef".split()]
    rules += [(f, given[f] >= 0, ">= 0") for f in "kl-coef kl-target policy-lag eval-samples eval-every".split()]
    rules += [
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32)"),
        ("group-size", args.group_size >= 2, ">= 2: a completion's advantage divides by its group's standard deviation"),
        # AdamW's first step is 10 x the learning rate, a float32 scalar; above ~3.4e37 it cannot be converted
        ("learning-rate", args.learning_rate <= 3e37, "<= 3e37, so that AdamW's first step (10 x it) is a float32"),
        # max(1, ...): a count under 1 is refused by the rule above, which comes first
        ("num-minibatches", batch % max(1, args.num_minibatches) == 0, f"a divisor of --num-prompts x --group-size = {batch}"),
        ("synthetic-ops", args.synthetic_ops and set(args.synthetic_ops) <= set("+-*"), "a subset of '+-*'"),
        ("dataset", args.dataset_path or args.dataset in ("openai/gsm8k", "synthetic"), "openai/gsm8k or synthetic"),
        ("dataset-path", args.dataset_path is None or os.path.isfile(args.dataset_path), "a file"),
        (
            "model-name-or-path",
            not model_folder or os.path.isfile(os.path.join(args.model_name_or_path, "config.json")),
            "a hub id or a model folder with a config.json",
        ),
        ("track", not args.track or importlib.util.find_spec("wandb"), "off without wandb"),
    ]
    for flag, valid, valid_range in rules:
        if not valid:
            raise SystemExit(f"error: --{flag} must be {valid_range} (got {given[flag]})")


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    check_args(args)
    train_problems, eval_problems = load_problems(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # after the checks: bad input fails fast

    if platform.libc_ver()[0] == "glibc":
        # glibc serves blocks under an adaptive threshold (up to 32 MB: most tensors here) from its heap and keeps their
        # pages once freed, so the process would hold the peaks of sampling and of the learner at once. A fixed 1 MB
        # threshold gives each larger tensor pages of its own, returned to the system when it is freed.
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # -3: M_MMAP_THRESHOLD

    data_name = os.path.basename(args.dataset_path) if args.dataset_path else args.dataset.split("/")[-1]
    run_name = f"{data_name}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu" and args.policy_lag > 0:
        # the generator and the learner run at once; each gets half the cores instead of fighting over all
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))

    try:  # fp32 master weights whatever --dtype: AdamW steps of 1e-6 round to zero on bf16 weights
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).to(device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not load {args.model_name_or_path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    eos = model.generation_config.eos_token_id  # an id, a list of ids or None
    end_ids = {tokenizer.eos_token_id, *np.atleast_1d(eos).tolist()} - {None}  # the tokenizer's and the model's
    eos_ids = torch.tensor(sorted(end_ids), device=device)
    for module in model.modules():  # the ratio pi_theta / beta must compare the same deterministic function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant torch.utils.checkpoint around each decoder layer
    model.train()

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)

    # generation: a thread with its own fp32 copy of the weights samples up to K batches ahead, through a bounded queue;
    # each thread has its own random streams, so that their interleaving does not change a seed's run
    problem_rng = np.random.default_rng(args.seed)
    sampling_rng = torch.Generator(device).manual_seed(args.seed)
    shuffle_rng = torch.Generator().manual_seed(args.seed + 1)
    produce = partial(
        make_batch,
        tokenizer=tokenizer,
        problems=train_problems,
        args=args,
        eos_ids=eos_ids,
        problem_rng=problem_rng,
        sampling_rng=sampling_rng,
    )
    weight_queue = queue.Queue()  # (version, weights) from the learner, None to stop
    batch_queue = queue.Queue(maxsize=max(1, args.policy_lag))  # batches (or the generator's exception) to the learner
    stop = threading.Event()
    generator_model = deepcopy(model).eval().requires_grad_(False)
    generator_args = (generator_model, weight_queue, batch_queue, stop, produce, args, torch.get_num_threads())
    generator = threading.Thread(target=generator_thread, args=generator_args, daemon=True)
    generator.start()

    # start
    step = 0
    start_time = time.time()
    stop_requested = False

    def request_stop(signum, frame):
        """Ctrl-C or SIGTERM: finish the current step, then save and close the logs; a second Ctrl-C aborts."""
        global stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def evaluate(step):
        """Greedy accuracy and format rate on the held-out problems."""
        if args.eval_samples > 0:
            batch = rollout(model.eval(), tokenizer, eval_problems, args, eos_ids)
            model.train()
            accuracy = batch["reward"].mean().item()
            format_rate = batch["format"].mean().item()
            writer.add_scalar("eval/accuracy", accuracy, step)
            writer.add_scalar("eval/format_rate", format_rate, step)
            print(f"eval at step {step}: greedy accuracy {accuracy:.3f} | format {format_rate:.3f}", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    kl_coef = args.kl_coef
    try:  # whatever stops the learner stops the generator thread first (finally)
        evaluate(0)
        for step in range(1, args.total_steps + 1):
            if stop_requested:
                print(f"interrupted at step {step - 1}; closing the logs", flush=True)
                break
            step_start = time.time()
            batch = batch_queue.get()
            if isinstance(batch, BaseException):
                raise batch
            train_start = time.time()
            logged = update(model, optimizer, batch, args, kl_coef, shuffle_rng)
            diverged = [key for key, value in logged.items() if not np.isfinite(value)]
            finite = torch.stack([p.isfinite().all() for p in model.parameters()]).tolist()  # one host sync a step
            names = [name for name, _ in model.named_parameters()]
            diverged += [f"parameter {name}" for name, ok in zip(names, finite) if not ok]
            if diverged:  # before the weights reach the generator; the logs close, the model is not saved
                raise SystemExit(
                    f"error: diverged at step {step}: {diverged[0]} is not finite; try a lower "
                    f"--learning-rate ({args.learning_rate:g}) or --max-grad-norm ({args.max_grad_norm:g})"
                )
            if step == 1:  # both threads held the same weights: pi_T / beta differs from 1 by rounding only
                floor = 2 * logged["align/tv_behavior"]  # L1, the unit of delta
                logged["align/numerical_floor"] = floor
                print(
                    f"numerical floor of --dtype {args.dtype} at step 1: mean|pi_T/beta - 1| = {floor:.1e} (L1 = 2 x "
                    f"align/tv_behavior) against --tv-delta {args.tv_delta:g} (L1)",
                    flush=True,
                )
                if floor > args.tv_delta / 10:
                    print(
                        "warning: the floor is over --tv-delta / 10 (L1): the filter would read rounding as lag; use "
                        "--dtype float32 or a larger --tv-delta",
                        flush=True,
                    )
            if step < args.total_steps - args.policy_lag:  # the generator loads no later version: keep none unread
                snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}  # version `step`
                if device.type == "cuda":  # the generator reads it on its own stream: finish the copy first
                    torch.cuda.current_stream().synchronize()
                weight_queue.put((step, snapshot))
                del snapshot  # the queue holds the only reference: the generator frees it once loaded
            train_s = time.time() - train_start
            step_s = time.time() - step_start
            num_tokens = int(batch["valid"].sum())

            # log the iteration
            logged.update(
                {
                    "charts/policy_lag": (step - 1) - batch["version"],  # versions between the generator's and pi_T
                    "charts/reward_mean": batch["reward"].mean().item(),
                    "charts/kl_coef": kl_coef,
                    "charts/format_rate": batch["format"].mean().item(),
                    "perf/train_s": train_s,
                    "perf/step_s": step_s,
                    "charts/response_length": num_tokens / len(batch["valid"]),
                    "perf/generate_s": batch["generate_s"],
                    "perf/generate_tokens_per_s": num_tokens / batch["generate_s"],
                    "perf/wait_s": train_start - step_start,
                    "perf/tokens_per_s": num_tokens / step_s,
                    "charts/learning_rate": optimizer.param_groups[0]["lr"],
                }
            )
            for key, value in logged.items():
                writer.add_scalar(key, value, step)
            kl_coef = adapt_kl_coef(kl_coef, logged["losses/approx_kl"], args.kl_target)  # fixed if kl_target = 0
            print(
                f"step {step:>5} | reward {logged['charts/reward_mean']:.3f} | format "
                f"{logged['charts/format_rate']:.2f} | lag {logged['charts/policy_lag']} | tv "
                f"{logged['losses/tv']:.3f} | filtered {logged['losses/filtered_frac']:.3f} | gen "
                f"{batch['generate_s']:.2f}s train {train_s:.2f}s",
                flush=True,
            )
            if args.eval_every > 0 and step % args.eval_every == 0 and step < args.total_steps:
                evaluate(step)
        if not stop_requested:
            evaluate(args.total_steps)
    except Exception as e:  # one line, not a traceback from two threads
        hint = "; lower --micro-batch-size or --generation-batch-size" if isinstance(e, torch.OutOfMemoryError) else ""
        raise SystemExit(f"error: stopped at step {step}: {type(e).__name__}: {e}".splitlines()[0] + hint) from None
    finally:
        stop.set()
        weight_queue.put(None)
        while generator.is_alive():  # it may wait to put a batch: take it
            with contextlib.suppress(queue.Empty):
                batch_queue.get(timeout=0.1)
        writer.close()

    if args.save_model:
        model.save_pretrained(f"runs/{run_name}/model")  # the fp32 master weights
        tokenizer.save_pretrained(f"runs/{run_name}/model")
        print(f"model saved to runs/{run_name}/model")
    print(f"done in {time.time() - start_time:.1f}s")
    if stop_requested:
        sys.exit(130)
