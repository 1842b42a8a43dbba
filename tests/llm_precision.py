"""Opt-in measurement (not part of the test suite): the lag-0 floor and the CPU cost of each compute precision of
vaco_llm_math.py, float16 autocast included, which the script does not offer (the studies page's "LLM: the numerical
floor at lag 0" says why). Per precision and seed it samples one batch of synthetic addition problems
(--num-prompts x --group-size completions of up to --max-new-tokens) with the script's `sample`, then takes the
learner's log-probs of the same tokens with its `completion_logprobs` and their backward pass (activation
checkpointing on, as in the script), both under the precision's autocast over the same fp32 weights, on one thread:

  floor_l1       mean|pi_T/beta - 1| over the sampled tokens, the unit of --tv-delta: both passes hold the same
                 weights, so this is rounding alone (the script logs it as align/numerical_floor at step 1)
  sample_cpu_s   CPU-seconds of sampling the batch
  learner_cpu_s  CPU-seconds of the learner's forward and backward pass over it

    python tests/llm_precision.py --model-name-or-path ~/models/SmolLM2-135M-Instruct

writes the records to tests/results/llm_precision.json and prints the table of the studies page (the floor's range
over the seeds, its share of δ = 0.05 and the median CPU-seconds); --report-only prints the table of that file.
"""

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "tests" / "results" / "llm_precision.json"
AUTOCAST = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
LABELS = {
    "float32": "`--dtype float32` (default)",
    "float16": "float16 autocast (not in the script)",
    "bfloat16": "`--dtype bfloat16`",
}
TV_DELTA = 0.05  # vaco_llm_math.py's default


def measure(llm, model, tokenizer, eos_ids, precision, seed, args):
    """One batch at one precision: the floor and the CPU-seconds of sampling and of the learner's pass."""
    problems = llm.make_synthetic_problems(args.num_prompts, seed, max_number=10, ops="+")
    questions = [problem["question"] for problem in problems for _ in range(args.group_size)]
    prompt_ids, prompt_mask = llm.encode_prompts(tokenizer, questions, "cpu")
    autocast = torch.autocast("cpu", AUTOCAST[precision] or torch.bfloat16, enabled=AUTOCAST[precision] is not None)
    with autocast:
        model.eval()  # as the script's generator: layers checkpointed in training mode cannot use the KV cache
        start = time.process_time()
        sampling_rng = torch.Generator().manual_seed(seed)
        completions, behavior_logprob, valid = llm.sample(
            model, prompt_ids, prompt_mask, args.max_new_tokens, 1.0, eos_ids, tokenizer.pad_token_id, sampling_rng
        )
        sample_cpu_s = time.process_time() - start
        model.train()  # as the script's learner
        start = time.process_time()
        logprob, _ = llm.completion_logprobs(model, prompt_ids, prompt_mask, completions, valid, 1.0)
    logprob.mean().backward()
    learner_cpu_s = time.process_time() - start
    model.zero_grad(set_to_none=True)
    ratio = (logprob.detach() - behavior_logprob[valid]).exp()
    return {
        "precision": precision,
        "seed": seed,
        "tokens": int(valid.sum()),
        "floor_l1": (ratio - 1).abs().mean().item(),
        "sample_cpu_s": round(sample_cpu_s, 2),
        "learner_cpu_s": round(learner_cpu_s, 2),
    }


def span(low, high):
    """A range as printed, or one value where both ends print alike."""
    return low if low == high else f"{low}-{high}"


def table(records):
    """Per precision: the floor's range over the seeds, its share of δ and the median CPU-seconds."""
    lines = ["| compute | lag-0 floor, L1 | share of δ | sample / learner (CPU-s) |", "|---|---|---|---|"]
    for precision in AUTOCAST:
        rows = [record for record in records if record["precision"] == precision]
        if not rows:
            continue
        low, high = min(row["floor_l1"] for row in rows), max(row["floor_l1"] for row in rows)
        sample_s = statistics.median(row["sample_cpu_s"] for row in rows)
        learner_s = statistics.median(row["learner_cpu_s"] for row in rows)
        floor = span(f"{low:.1e}", f"{high:.1e}")
        share = span(f"{100 * low / TV_DELTA:.2g}", f"{100 * high / TV_DELTA:.2g}")
        lines.append(f"| {LABELS[precision]} | {floor} | {share}% | {sample_s:.1f} / {learner_s:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-name-or-path", help="a model folder (fp32 weights are loaded whatever its dtype)")
    parser.add_argument("--precisions", nargs="+", choices=list(AUTOCAST), default=list(AUTOCAST))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RECORDS, help="the JSON file of the records")
    parser.add_argument("--report-only", action="store_true", help="print the table of --out; measure nothing")
    args = parser.parse_args()
    if args.report_only:
        print(table(json.loads(args.out.read_text())["records"]), end="")
        return
    if not args.model_name_or_path:
        parser.error("--model-name-or-path is required unless --report-only")
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vaco_llm_math as llm

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    for module in model.modules():  # as the script: the ratio must compare the same deterministic function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.activation_checkpointing_enable()
    end_ids = {tokenizer.eos_token_id, *torch.tensor(model.generation_config.eos_token_id or []).view(-1).tolist()}
    eos_ids = torch.tensor(sorted(end_ids - {None}))
    records = []
    for precision in args.precisions:
        for seed in args.seeds:
            records.append(measure(llm, model, tokenizer, eos_ids, precision, seed, args))
            print(json.dumps(records[-1]), flush=True)
    command = " ".join(["python", "tests/llm_precision.py", *sys.argv[1:]])
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"^model name\s*: (.+)$", cpuinfo, re.M)
    about = {"command": command, "torch": torch.__version__, "cpu": cpu.group(1) if cpu else platform.machine()}
    args.out.write_text(json.dumps(about | {"records": records}, indent=1) + "\n")
    print(table(records), end="")


if __name__ == "__main__":
    main()
