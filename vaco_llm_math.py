# VACO for a small LLM on math word problems (GSM8K by default), with asynchronous generation.
# Paper: "Align and Filter: Improving Performance in Asynchronous On-Policy RL", arXiv 2603.01365.
# GRPO-style: no critic, so nothing for V-trace to realign; this is FILTER only (spec section 6). A generator
# thread with its own copy of the weights samples the batches of future steps while the learner trains, so each
# batch is --policy-lag versions old; every minibatch drops, outside the TV trust region, the tokens that would
# push the policy further from the generator's.
import contextlib
import json
import os
import queue
import random
import re
import signal
import sys
import threading
import time
from copy import deepcopy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


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
    """whether to save the final model and tokenizer (`save_pretrained`) to `runs/{run_name}/model`"""

    # Model and data
    model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """a Hugging Face hub id or a local model folder (bf16 on CUDA, fp32 on CPU)"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the learner's backward pass"""
    dataset: str = "openai/gsm8k"
    """`openai/gsm8k` (config `main`: train split for RL, test split for evaluation) or `synthetic` (offline)"""
    dataset_path: str | None = None
    """a local JSONL file of {"question", "answer"} records in GSM8K format (gold after `####`); overrides
    --dataset; the last --eval-samples records are held out for evaluation"""
    synthetic_max_number: int = 20
    """--dataset synthetic: operands are drawn from 1..N"""
    synthetic_ops: str = "+-*"
    """--dataset synthetic: the operations its word problems use, a subset of `+-*`"""

    # rollouts and optimization
    total_steps: int = 200
    """the number of learner steps (one batch of rollouts each)"""
    learning_rate: float = 1e-6
    """the learning rate of the AdamW optimizer"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
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
    policy_loss: Literal["vaco", "ppo", "spo"] = "vaco"
    """the policy loss: `vaco` (TV filter), or the `ppo` (clipped, token-level GRPO) and `spo` baselines"""
    tv_delta: float = 0.2
    """FILTER: trust-region bound on the sampled L1 distance mean|pi/beta - 1| (= 2 TV) of a minibatch"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient of `ppo`, and the penalty scale of `spo`"""
    policy_lag: int = 1
    """K: a generator thread samples the batch of each step with weights K learner steps old (0: synchronous)"""

    # Evaluation
    eval_samples: int = 200
    """held-out problems scored with greedy decoding (0 to skip evaluation)"""
    eval_every: int = 20
    """evaluate every this many steps (and at the start and the end; 0: only at the start and the end)"""

    # derived from the flags above
    batch_size: int = 0
    """sequences per batch (set at start-up)"""
    minibatch_size: int = 0
    """sequences per minibatch (set at start-up)"""


def check_args(args):
    """Stop with a one-line message, before any model is loaded, on input the run cannot use."""
    batch_size = args.num_prompts * args.group_size
    problems = [
        (args.group_size < 2, f"--group-size must be >= 2 (got {args.group_size}): advantages compare the "
                              "completions of one prompt"),
        (args.tv_delta <= 0, f"--tv-delta must be > 0 (got {args.tv_delta}); the paper uses 0.2"),
        (args.policy_lag < 0, f"--policy-lag must be >= 0 (got {args.policy_lag})"),
        (args.temperature <= 0, f"--temperature must be > 0 (got {args.temperature})"),
        (min(args.num_prompts, args.total_steps, args.max_new_tokens, args.num_minibatches, args.update_epochs,
             args.micro_batch_size, args.generation_batch_size, args.synthetic_max_number) < 1,
         "--num-prompts, --total-steps, --max-new-tokens, --num-minibatches, --update-epochs, --micro-batch-size, "
         "--generation-batch-size and --synthetic-max-number must be >= 1"),
        (batch_size % max(args.num_minibatches, 1) != 0,
         f"the batch of --num-prompts x --group-size = {batch_size} sequences does not split into "
         f"--num-minibatches {args.num_minibatches} equal minibatches; pick a divisor"),
        (min(args.eval_samples, args.eval_every) < 0, "--eval-samples and --eval-every must be >= 0"),
        (args.policy_loss != "vaco" and args.clip_coef <= 0, f"--clip-coef must be > 0 (got {args.clip_coef})"),
        (not args.synthetic_ops or set(args.synthetic_ops) - set("+-*"),
         f"--synthetic-ops must be a non-empty subset of '+-*' (got {args.synthetic_ops!r})"),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")
    if args.dataset_path is not None:
        if not os.path.isfile(args.dataset_path):
            raise SystemExit(f"error: --dataset-path {args.dataset_path} is not a file")
    elif args.dataset not in ("openai/gsm8k", "synthetic"):
        raise SystemExit(f"error: unknown --dataset {args.dataset!r}; use openai/gsm8k, synthetic, "
                         "or --dataset-path FILE.jsonl")
    path = args.model_name_or_path
    if os.path.exists(path) or path.startswith(("/", ".", "~")):  # a local folder, not a hub id
        if not os.path.isdir(path):
            raise SystemExit(f"error: --model-name-or-path {path} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"error: --model-name-or-path {path} has no config.json; is it a model folder?")


# Answers: the last \boxed{...}, else the last number; compared numerically with the gold number.
NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


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
    depth, begin = 0, start + len("\\boxed{") - 1
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
    if "####" not in answer:
        raise ValueError("no '####' before the final answer")
    value = parse_number(answer.split("####")[-1])
    if value is None:
        raise ValueError("no number after '####'")
    return value


def reward_fn(completion, gold):
    """(reward 1.0 if the answer equals the gold number numerically else 0.0, format: a \\boxed{} was present)."""
    answer, boxed = extract_answer(completion)
    correct = answer is not None and abs(answer - gold) <= 1e-6 * max(1.0, abs(gold))
    return float(correct), float(boxed)


def make_synthetic_problems(n, seed, max_number=20, ops="+-*"):
    """GSM8K-format arithmetic word problems: one operation on two numbers, with the worked answer."""
    rng = random.Random(seed)
    names, items = ["Ava", "Ben", "Mia", "Leo", "Zoe", "Sam"], ["apples", "books", "coins", "pens", "cards"]
    problems = []
    for _ in range(n):
        name, item, op = rng.choice(names), rng.choice(items), rng.choice(ops)
        a, b = rng.randint(1, max_number), rng.randint(1, max_number)
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


def load_problems(args):
    """(train, eval) lists of (question, gold number); bad records stop the run before the model loads."""
    if args.dataset_path is not None:
        records = []
        with open(args.dataset_path) as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    records.append((record["question"], gold_answer(record["answer"])))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise SystemExit(f"error: {args.dataset_path}:{line_number}: not a GSM8K record "
                                     f"{{\"question\", \"answer\"}} with the gold after '####' ({e!r})")
        if len(records) <= args.eval_samples:
            raise SystemExit(f"error: {args.dataset_path} has {len(records)} records; it needs more than "
                             f"--eval-samples {args.eval_samples} (held out for evaluation)")
        return records[: len(records) - args.eval_samples], records[len(records) - args.eval_samples :]
    if args.dataset == "synthetic":
        make = lambda n, seed: [(p["question"], gold_answer(p["answer"])) for p in  # noqa: E731
                                make_synthetic_problems(n, seed, args.synthetic_max_number, args.synthetic_ops)]
        return make(10_000, args.seed), make(args.eval_samples, args.seed + 10_000)
    import datasets  # only here: it is slow to import and offline runs do not need it

    try:
        data = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:
        raise SystemExit(f"error: could not load openai/gsm8k ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "offline, use --dataset synthetic or --dataset-path FILE.jsonl")
    to_pairs = lambda split: [(r["question"], gold_answer(r["answer"])) for r in split]  # noqa: E731
    return to_pairs(data["train"]), to_pairs(data["test"])[: args.eval_samples]


def format_prompt(tokenizer, question):
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\n{INSTRUCTION}\nAnswer:"


def encode_prompts(tokenizer, questions, device):
    """Left-padded prompt ids and mask, so every completion starts at the same column."""
    texts = [format_prompt(tokenizer, q) for q in questions]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_ids, pad_id, generator=None):
    """Sample completions with a KV cache, recording the log-prob of each sampled token under the sampling
    distribution (beta). generator=None decodes greedily. Returns completions [B, L], their log-probs [B, L] and
    the mask of valid tokens [B, L] (up to and including the first end-of-sequence token)."""
    batch = prompt_ids.shape[0]
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    ids, mask, past = prompt_ids, prompt_mask, None
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs, valid = [], [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
        if generator is None:
            token = logp.argmax(-1)
        else:
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logprobs.append(logp.gather(-1, token.unsqueeze(-1)).squeeze(-1))
        valid.append(~done)
        done = done | torch.isin(token, eos_ids)
        if done.all():
            break
        ids, position_ids = token.unsqueeze(-1), position_ids[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(valid, 1)


def completion_logprobs(model, prompt_ids, prompt_mask, completions, temperature, with_entropy=False):
    """log pi(y_t | x, y_<t) of every completion token [B, L] (and the token entropy), in one forward pass
    with the same positions as sampling, so pi_T = beta up to float rounding."""
    mask = torch.cat([prompt_mask, torch.ones_like(completions)], dim=-1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    length = completions.shape[1]
    logits = model(input_ids=torch.cat([prompt_ids, completions], dim=-1), attention_mask=mask,
                   position_ids=position_ids, use_cache=False, logits_to_keep=length + 1).logits[:, :-1]
    logits = logits.float() / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logprob = logits.gather(-1, completions.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logprob, None
    entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprob, entropy


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


def trim(prompt_ids, prompt_mask, completions, valid):
    """Drop the columns that are padding in every row of a micro-batch (left of the prompts, right of the
    completions); positions and valid tokens are unchanged."""
    first = int(prompt_mask.any(0).nonzero()[0])
    last = max(1, int(valid.sum(1).max()))
    return prompt_ids[:, first:], prompt_mask[:, first:], completions[:, :last], valid[:, :last]


def minibatch_policy_gradient(model, micro_batches, behavior_logprob, advantages, args):
    """Accumulate into the model's .grad the gradient of policy_loss on one minibatch, in bounded memory.

    The gate and the mask need pi_theta on the whole minibatch before any backward pass, so a no-grad pass
    computes the token log-probs, policy_loss and its gradient with respect to them; each micro-batch then
    backpropagates its share of that gradient through the model: the exact gradient of the minibatch loss.
    micro_batches holds (prompt_ids, prompt_mask, completions, valid); behavior_logprob and advantages are 1-D
    over the valid tokens, in micro-batch then row-major order. Returns (pg_loss, stats, log pi_theta, entropy),
    the last two on the valid tokens before this update.
    """
    with torch.no_grad():
        newlogprob, entropy = [], []
        for prompt_ids, prompt_mask, completions, valid in micro_batches:
            lp, ent = completion_logprobs(model, prompt_ids, prompt_mask, completions, args.temperature,
                                          with_entropy=True)
            newlogprob.append(lp[valid])
            entropy.append(ent[valid])
        newlogprob, entropy = torch.cat(newlogprob), torch.cat(entropy)
    newlogprob.requires_grad_(True)
    pg_loss, pg_stats = policy_loss(args.policy_loss, newlogprob, behavior_logprob, advantages, args.tv_delta,
                                    args.clip_coef)
    (token_grad,) = torch.autograd.grad(pg_loss, newlogprob)
    offset = 0
    for prompt_ids, prompt_mask, completions, valid in micro_batches:
        lp = completion_logprobs(model, prompt_ids, prompt_mask, completions, args.temperature)[0][valid]
        (lp * token_grad[offset : offset + len(lp)]).sum().backward()
        offset += len(lp)
    return pg_loss.detach(), pg_stats, newlogprob.detach(), entropy


def rollout(model, tokenizer, problems, args, eos_ids, generator=None):
    """Sample (or, with generator=None, decode greedily) one completion per problem, in chunks of
    --generation-batch-size; returns a batch on the CPU with rewards and format flags."""
    chunks = []
    for start in range(0, len(problems), args.generation_batch_size):
        chunk = problems[start : start + args.generation_batch_size]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [q for q, _ in chunk], eos_ids.device)
        completions, logprobs, valid = sample(model, prompt_ids, prompt_mask, args.max_new_tokens,
                                              args.temperature, eos_ids, tokenizer.pad_token_id, generator)
        texts = tokenizer.batch_decode(completions.masked_fill(~valid, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        scores = torch.tensor([reward_fn(text, gold) for text, (_, gold) in zip(texts, chunk)])
        chunks.append({"prompt_ids": prompt_ids.cpu(), "prompt_mask": prompt_mask.cpu(), "completions":
                       completions.cpu(), "behavior_logprob": logprobs.cpu(), "valid": valid.cpu(),
                       "reward": scores[:, 0], "format": scores[:, 1], "text": texts})
    return {key: concat_padded([c[key] for c in chunks], key) for key in chunks[0]}


def concat_padded(parts, key):
    """Concatenate per-chunk tensors along the batch; prompts are left-padded, completions right-padded."""
    if key == "text":
        return [text for part in parts for text in part]
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    left = key.startswith("prompt")
    padded = [nn.functional.pad(p, (width - p.shape[1], 0) if left else (0, width - p.shape[1])) for p in parts]
    return torch.cat(padded)


def make_batch(model, tokenizer, train_problems, step, args, eos_ids, rng, generator):
    """The rollouts of one learner step: --num-prompts problems x --group-size samples (group members adjacent)."""
    start_time = time.time()
    problems = [train_problems[i] for i in rng.choice(len(train_problems), args.num_prompts, replace=False)]
    batch = rollout(model, tokenizer, [p for p in problems for _ in range(args.group_size)], args, eos_ids,
                    generator)
    batch["generate_s"] = time.time() - start_time
    return batch


def generator_thread(model, weight_queue, batch_queue, produce, args, num_threads):
    """Produce the batch of every step T with the weights of version T - 1 - K (the learner's version at the
    start of step T is T - 1), loading each new version the learner publishes after its steps."""
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
                batch = produce(model, step)
                batch["version"] = version
                batch_queue.put(batch)
    except BaseException as e:  # the learner re-raises it
        batch_queue.put(e)


def evaluate(model, tokenizer, eval_problems, args, eos_ids):
    """Greedy accuracy and format rate of the learner on the held-out problems."""
    was_training = model.training
    model.eval()
    batch = rollout(model, tokenizer, eval_problems, args, eos_ids)
    model.train(was_training)
    return batch["reward"].mean().item(), batch["format"].mean().item()


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    check_args(args)
    args.batch_size = args.num_prompts * args.group_size
    args.minibatch_size = args.batch_size // args.num_minibatches
    train_problems, eval_problems = load_problems(args)
    if len(train_problems) < args.num_prompts:
        raise SystemExit(f"error: {len(train_problems)} training problems, fewer than --num-prompts {args.num_prompts}")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # after the checks: bad input fails fast

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

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
        ).to(device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not load {args.model_name_or_path} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos_ids = torch.tensor(sorted(set(eos + [tokenizer.eos_token_id]) - {None}), device=device)
    for module in model.modules():  # the ratio pi_theta / beta must compare the same deterministic function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}")
    flag_table = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
    writer.add_text("hyperparameters", f"|flag|value|\n|-|-|\n{flag_table}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    # generation: with lag K > 0 a thread with its own copy of the weights samples ahead through a bounded queue
    data_rng = np.random.default_rng(args.seed)
    sampler = torch.Generator(device).manual_seed(args.seed)  # own RNG streams: the two threads do not interleave
    shuffler = torch.Generator().manual_seed(args.seed + 1)
    produce = lambda m, step: make_batch(m, tokenizer, train_problems, step, args, eos_ids, data_rng,  # noqa: E731
                                         sampler)
    if args.policy_lag > 0:
        generator_model = deepcopy(model).eval().requires_grad_(False)
        weight_queue, batch_queue = queue.Queue(), queue.Queue(maxsize=args.policy_lag)
        generator_args = (generator_model, weight_queue, batch_queue, produce, args, torch.get_num_threads())
        threading.Thread(target=generator_thread, args=generator_args, daemon=True).start()

    # start
    step = 0
    start_time = time.time()
    stop_requested = False

    def request_stop(signum, frame):
        """Ctrl-C or SIGTERM: finish the current step, then save and close the logs; a second Ctrl-C aborts."""
        global stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    model_path = f"runs/{run_name}/model"
    recent_rewards = []

    def log_eval(step):
        if args.eval_samples > 0:
            accuracy, format_rate = evaluate(model, tokenizer, eval_problems, args, eos_ids)
            writer.add_scalar("eval/accuracy", accuracy, step)
            writer.add_scalar("eval/format_rate", format_rate, step)
            print(f"eval at step {step}: greedy accuracy {accuracy:.3f} | format {format_rate:.3f}", flush=True)

    log_eval(0)
    for step in range(1, args.total_steps + 1):
        if stop_requested:
            print(f"interrupted at step {step - 1}; closing the logs{' and saving the model' * args.save_model}")
            break
        step_start = time.time()
        if args.policy_lag > 0:
            batch = batch_queue.get()
            if isinstance(batch, BaseException):
                raise batch
        else:
            model.eval()
            batch = produce(model, step)
            batch["version"] = step - 1
            model.train()
        wait_s = time.time() - step_start
        train_start = time.time()
        batch_lag = (step - 1) - batch["version"]  # versions between the generator's weights and pi_T

        # GRPO advantages: reward standardized within each group of completions of one prompt
        rewards = batch["reward"].view(args.num_prompts, args.group_size)
        seq_advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
        b_prompt_ids, b_prompt_mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
        b_completions, b_valid = batch["completions"].to(device), batch["valid"].to(device)
        b_logprobs = batch["behavior_logprob"].to(device)  # log beta(y_t), recorded while sampling
        b_advantages = seq_advantages.reshape(-1, 1).expand_as(b_valid).to(device)

        # FILTER: every minibatch against the behavior log-probs, over its valid completion tokens
        minibatch_stats = []
        tv_behavior = None
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(args.batch_size, generator=shuffler).to(device)
            for start in range(0, args.batch_size, args.minibatch_size):
                mb_inds = b_inds[start : start + args.minibatch_size]
                micro_batches = [
                    trim(b_prompt_ids[inds], b_prompt_mask[inds], b_completions[inds], b_valid[inds])
                    for inds in mb_inds.split(args.micro_batch_size)
                ]
                mb_valid = b_valid[mb_inds]  # 1-D token tensors from here on: padding never enters the loss
                mb_logprobs, mb_advantages = b_logprobs[mb_inds][mb_valid], b_advantages[mb_inds][mb_valid]

                optimizer.zero_grad()
                pg_loss, pg_stats, newlogprob, entropy = minibatch_policy_gradient(
                    model, micro_batches, mb_logprobs, mb_advantages, args)
                if tv_behavior is None:  # first minibatch of the step: pi_theta is still pi_T
                    tv_behavior = 0.5 * ((newlogprob - mb_logprobs).exp() - 1).abs().mean().item()
                nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()

                with torch.no_grad():  # http://joschu.net/blog/kl-approx.html, against the behavior policy
                    logratio = newlogprob - mb_logprobs
                    ratio = logratio.exp()
                    minibatch_stats.append({
                        "losses/policy_loss": pg_loss.item(),
                        "losses/entropy": entropy.mean().item(), "losses/old_approx_kl": (-logratio).mean().item(),
                        "losses/approx_kl": ((ratio - 1) - logratio).mean().item(),
                        "losses/clipfrac": ((ratio - 1.0).abs() > args.clip_coef).float().mean().item(),
                        "losses/tv": pg_stats["tv"], "losses/filtered_frac": pg_stats["filtered_frac"],
                        "losses/filter_gate_frac": pg_stats["gate"],
                    })

        if args.policy_lag > 0:  # publish version `step` for the generator
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if device.type == "cuda":  # the generator reads it on its own stream: finish the copy first
                torch.cuda.current_stream().synchronize()
            weight_queue.put((step, snapshot))
        train_s = time.time() - train_start
        step_s = time.time() - step_start
        num_tokens = int(batch["valid"].sum())
        recent_rewards = (recent_rewards + [batch["reward"].mean().item()])[-10:]

        # log the iteration
        logged = {key: np.mean([stats[key] for stats in minibatch_stats]) for key in minibatch_stats[0]}
        logged.update({
            "align/tv_behavior": tv_behavior, "charts/policy_lag": batch_lag, "charts/policy_lag_max": batch_lag,
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/reward_mean": batch["reward"].mean().item(),
            "charts/format_rate": batch["format"].mean().item(),
            "charts/response_length": num_tokens / args.batch_size,
            "perf/generate_s": batch["generate_s"], "perf/train_s": train_s, "perf/wait_s": wait_s,
            "perf/step_s": step_s, "perf/tokens_per_s": num_tokens / step_s,
        })
        for key, value in logged.items():
            writer.add_scalar(key, value, step)
        print(f"step {step:>5} | reward {logged['charts/reward_mean']:.3f} "
              f"(last 10: {np.mean(recent_rewards):.3f}) | format {logged['charts/format_rate']:.2f} | "
              f"lag {batch_lag} | tv {logged['losses/tv']:.3f} | filtered {logged['losses/filtered_frac']:.3f} | "
              f"gen {batch['generate_s']:.2f}s train {train_s:.2f}s step {step_s:.2f}s", flush=True)
        if args.eval_every > 0 and step % args.eval_every == 0 and step < args.total_steps:
            log_eval(step)
    if not stop_requested:
        log_eval(args.total_steps)

    if args.policy_lag > 0:
        weight_queue.put(None)  # lets a waiting generator thread return
    if args.save_model:
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)
        print(f"model saved to {model_path}")

    writer.close()
    print(f"done in {time.time() - start_time:.1f}s")
    if stop_requested:
        sys.exit(130)
