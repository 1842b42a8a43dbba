"""Opt-in benchmark (not part of the test suite): run vaco_classic.py (or vaco_async_mp.py) over a grid of methods,
policy lags, seeds and environments as subprocesses, read the results back from the TensorBoard event files and print
markdown tables.

    python tests/benchmark_lag.py --env-ids CartPole-v1 --methods vaco ppo-noalign --lags 0 --seeds 1 2 3 4 5 6 7 8

--variants runs every method once per set of flags, written NAME=VALUE[,NAME=VALUE...] without the leading dashes
('default' adds none), e.g. for the sensitivity to the filter's threshold:

    python tests/benchmark_lag.py --methods vaco --lags 0 4 --variants tv-delta=0.05 tv-delta=0.1 default tv-delta=0.4

Real asynchronous lag: `--script vaco_async_mp.py --lags async` (the lag is measured, not set; --extra sets the
number of actors, e.g. '--num-actors 4').

Each finished run leaves a small summary, `{--summaries}/{run}.json` (committed under tests/results/summaries, so a
study resumes from what is committed, on any machine); a run with a summary is not run again, one without (stopped
before the end) runs again in an emptied folder, and the tables are made from the summaries. --report-only runs
nothing: it makes the tables of a grid from the summaries there are and lists the runs still missing. Event files and
stdout go to --out (one folder per run, named after the env, method, variant flags, lag and seed). Per run the summary
records:
  final     mean episodic return over the last 10% of the steps
  auc       area under the return curve divided by the steps it spans (trapezoid over the logged episodes), i.e. the
            average return during training: it tells apart runs that all end at CartPole's cap of 500
  sps       the last charts/SPS the run logged; wall_s, its wall time
  lag       the policy lag of its batches (charts/policy_lag): mean, max and the 10/50/90% quantiles of the
            per-iteration mean (for --policy-lag K they are all K); for vaco_async_mp.py also how many of the
            rollouts it trained on had each lag ('rollouts', from the line the script prints at the end)
  cmd       the exact command, from the repository's root
  peak_rss_mib  the run's peak resident memory in MiB: ru_maxrss of the run's own process (see LAUNCHER; for
            vaco_async_mp.py the largest single process, the learner or an actor, not their sum)
The tables' ± is the sample standard deviation over the seeds (ddof = 1; np.std's default, ddof = 0, understates
the spread of 3 seeds by 18%). With --results-dir it also writes a markdown table and a plot of the returns against
the lag per environment (matplotlib is needed for the plot only, and imported only then).

The LLM (`--script vaco_llm_math.py`): the methods are `vaco` and `ppo` (token-level GRPO-clip); it has no critic,
so no --no-realign, and a method or variant whose flags the script lacks is refused before anything runs. Its runs
are named after the data (--dataset or --dataset-path in --extra) instead of an env id, and a path in --extra names
the summaries folder by its last part (the model folder's name, not where it lies). The LLM lag study:

    python tests/benchmark_lag.py --script vaco_llm_math.py --methods vaco ppo --lags 1 4 --seeds 1 2 3 \
      --extra "--model-name-or-path SMOLLM2_FOLDER --dataset synthetic ..." --results-dir tests/results \
      --results-name llm_lag_study

Per run its summary records instead of the returns:
  accuracy        the greedy accuracy curve eval/accuracy, [[step, value], ...]
  accuracy_auc    its area divided by the steps it spans (trapezoid, as the AUC above); accuracy_first and
                  accuracy_final, its first and last points
  reward_mean     the sampled training reward charts/reward_mean, averaged over the steps
  gate, lag       as above (the LLM logs no charts/tv_delta: its bound is the fixed --tv-delta)
  numerical_floor align/numerical_floor, the L1 mean|pi_T/beta - 1| at step 1
and wall_s, peak_rss_mib and cmd. With --results-dir: {name}.md (a table per method and lag, then one row per
seed) and {name}_accuracy.png (greedy accuracy against the step, per method and lag: mean over the seeds, a band of
± the sample std, and each seed as a thin line).
"""

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from conftest import ROOT, read_scalars  # this folder is on the path when the script runs

METHODS = {  # name -> extra flags of vaco_classic.py
    "vaco": [],
    "ppo-noalign": ["--policy-loss", "ppo", "--no-realign"],  # naive asynchronous PPO
    "spo-noalign": ["--policy-loss", "spo", "--no-realign"],
    "vaco-noalign": ["--no-realign"],  # FILTER only
    "ppo": ["--policy-loss", "ppo"],  # ALIGN only
    "ppo-kl": ["--policy-loss", "ppo-kl", "--no-realign"],  # the paper's baseline: PPO with a KL penalty
    "vaco-learner": ["--tv-anchor", "learner"],  # the ratio anchored at pi_T (vaco_classic.py and vaco_atari.py)
    # IMPALA as it runs: one pass over each batch, V-trace's own advantage (lambda = 1); these override --extra's flags
    "impala": ["--policy-loss", "impala", "--update-epochs", "1", "--gae-lambda", "1"],
}


GATE_KEYS = {
    "closed": "losses/filter_gate_frac",
    "dropped": "losses/filtered_frac",
    "tv_behavior": "align/tv_behavior",
    "tv": "losses/tv",
    "tv_delta": "charts/tv_delta",
}


def series(scalars, key):
    """The steps and the values logged under `key` ({tag: [(step, value), ...]}), as two arrays (empty if absent)."""
    points = np.array(scalars.get(key, []), dtype=float).reshape(-1, 2)
    return points[:, 0], points[:, 1]


def area_per_step(steps, values):
    """The area under a curve (trapezoid over its points) divided by the steps it spans: its average over them."""
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0])) if len(steps) > 1 else float("nan")


def lag_stats(scalars):
    """Mean, max and the 10/50/90% quantiles of the per-iteration charts/policy_lag (None if not logged)."""
    _, lags = series(scalars, "charts/policy_lag")
    _, lag_max = series(scalars, "charts/policy_lag_max")
    if not len(lags):
        return None
    return {
        "mean": float(lags.mean()),
        "max": float(max(lags.max(), lag_max.max(initial=0))),
        "q10_50_90": [float(q) for q in np.quantile(lags, [0.1, 0.5, 0.9])],
    }


def gate_means(scalars):
    """What the filter did, averaged over the iterations: share of minibatches with the gate closed, share of samples
    dropped, the backward lag 0.5 mean|pi_T/beta - 1|, the forward move 0.5 mean|r - 1| and the bound in use (the
    keys the run logged)."""
    return {name: float(series(scalars, key)[1].mean()) for name, key in GATE_KEYS.items() if len(series(scalars, key)[1])}


def summarize(run_dir, total_steps):
    scalars = read_scalars(run_dir)  # {tag: [(step, value), ...]}
    steps, returns = series(scalars, "charts/episodic_return")
    _, sps = series(scalars, "charts/SPS")
    last = steps >= 0.9 * total_steps
    return {
        "final": float(returns[last].mean()) if last.any() else float("nan"),
        "auc": area_per_step(steps, returns),
        "sps": float(sps[-1]) if len(sps) else float("nan"),
        "episodes": int(len(returns)),
        "lag": lag_stats(scalars),
        "gate": gate_means(scalars),
    }


def summarize_llm(run_dir):
    """vaco_llm_math.py's run: the greedy accuracy curve and its average, the training reward, the gate, the lag and
    the numerical floor at step 1."""
    scalars = read_scalars(run_dir)
    steps, accuracy = series(scalars, "eval/accuracy")
    _, reward = series(scalars, "charts/reward_mean")
    _, floor = series(scalars, "align/numerical_floor")
    return {
        "accuracy": [[int(step), float(value)] for step, value in zip(steps, accuracy)],
        "accuracy_auc": area_per_step(steps, accuracy),
        "accuracy_first": float(accuracy[0]) if len(accuracy) else float("nan"),
        "accuracy_final": float(accuracy[-1]) if len(accuracy) else float("nan"),
        "reward_mean": float(reward.mean()) if len(reward) else float("nan"),
        "train_steps": int(len(reward)),
        "lag": lag_stats(scalars),
        "gate": gate_means(scalars),
        "numerical_floor": float(floor[0]) if len(floor) else None,
    }


def variant_flags(variant):
    """'tv-delta=0.1,rho-bar=2' -> ['--tv-delta', '0.1', '--rho-bar', '2']; 'default' -> []."""
    if variant == "default":
        return []
    pairs = [item.split("=", 1) for item in variant.split(",")]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise SystemExit(f"--variants: {variant!r} is not NAME=VALUE[,NAME=VALUE...] (or 'default')")
    return [token for name, value in pairs for token in (f"--{name}", value)]


def extra_name(extra):
    """['--total-timesteps', '1000000', '--num-envs', '1'] -> 'total-timesteps=1000000,num-envs=1'; a value with a
    '/' (a path or a hub id) by its last part, so that the name is one folder wherever the model lies."""
    flags = " ".join(extra).replace(" --", ",--").split(",")
    pairs = [flag.lstrip("-").partition(" ") for flag in flags]
    return ",".join(name + (f"={value.rstrip('/').split('/')[-1]}" if space else "") for name, space, value in pairs)


PATH_FLAGS = ("--model-name-or-path", "--dataset-path")  # vaco_llm_math.py's local paths


def with_absolute_paths(extra):
    """--extra with the local paths of PATH_FLAGS made absolute: each run starts in its own folder."""
    return [
        os.path.abspath(token) if i > 0 and extra[i - 1] in PATH_FLAGS and os.path.exists(token) else token
        for i, token in enumerate(extra)
    ]


def llm_data_name(extra):
    """What an LLM run trains on, named as the script names its run: the --dataset-path file's name, else the last
    part of --dataset (the last flag wins, as in the script)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dataset", default="openai/gsm8k")  # vaco_llm_math.py's default
    parser.add_argument("--dataset-path", default=None)
    data, _ = parser.parse_known_args(extra)
    return os.path.basename(data.dataset_path) if data.dataset_path else data.dataset.split("/")[-1]


def script_flags(script):
    """The flags a script's Args takes (tyro: --name, and --no-name for a boolean) and its --policy-loss choices."""
    after_class = Path(script).read_text().split("\nclass Args:\n", 1)[1]
    body = re.split(r"\n(?=\S)", after_class, maxsplit=1)[0]  # up to the first line that is not indented
    fields = re.findall(r"^    (\w+): (.+?) = ", body, re.M)
    flags = {"--" + name.replace("_", "-") for name, _ in fields}
    flags |= {"--no-" + name.replace("_", "-") for name, kind in fields if kind == "bool"}
    losses = re.search(r"^    policy_loss: Literal\[(.*)\]", body, re.M)
    return flags, ast.literal_eval(f"[{losses.group(1)}]") if losses else []


def unknown_flag(tokens, flags, losses):
    """The first of `tokens` (a method's or a variant's flags) that the script does not take, else None."""
    for i, token in enumerate(tokens):
        if token.startswith("--") and token not in flags:
            return token
        if token == "--policy-loss" and tokens[i + 1] not in losses:
            return f"--policy-loss {tokens[i + 1]}"
    return None


def run_name(method, variant):
    return method if variant == "default" else f"{method}+{variant}"


def run_tag(env_id, method, variant, lag, seed):
    return f"{env_id}__{run_name(method, variant)}__lag{lag}__s{seed}"


# A run's peak resident memory. Linux starts a process's ru_maxrss at the peak resident size of the process it was
# exec'd from, so a run started from this runner would inherit the runner's peak; instead a fresh interpreter
# (~10 MiB) forks the run and waits for it with os.wait4, whose rusage is that one child's (runs in parallel do not
# mix), and writes its ru_maxrss to a file. It exits with the run's exit code.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_one(job, out, summaries, script, total_steps_of, report_only=False):
    env_id, method, variant, lag, seed, extra = job
    tag = run_tag(env_id, method, variant, lag, seed)
    summary_file = summaries / f"{tag}.json"
    if summary_file.exists():
        return tag, json.loads(summary_file.read_text())
    if report_only:
        return tag, None
    run_dir = out / tag
    shutil.rmtree(run_dir, ignore_errors=True)  # a run folder without a summary is a run cut short: start afresh
    run_dir.mkdir(parents=True)
    lag_flags = [] if lag == "async" else ["--policy-lag", str(lag)]
    env_flags = [] if is_llm(script) else ["--env-id", env_id]  # the LLM's env_id names its data (llm_data_name)
    cmd = [
        sys.executable,
        str(script),
        *env_flags,
        "--seed",
        str(seed),
        *lag_flags,
        "--exp-name",
        tag,
        "--no-cuda",
        *extra,
        *METHODS[method],
        *variant_flags(variant),
    ]  # the last flag wins
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    launch = [sys.executable, "-c", LAUNCHER, str(run_dir / "ru_maxrss.txt"), *cmd]
    with open(run_dir / "stdout.txt", "w") as log:
        result = subprocess.run(launch, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        print(f"FAILED {tag} (exit {result.returncode}); see {run_dir / 'stdout.txt'}", flush=True)
        return tag, None
    summary = summarize_llm(run_dir) if is_llm(script) else summarize(run_dir, total_steps_of(env_id, extra))
    max_rss = int((run_dir / "ru_maxrss.txt").read_text())
    max_rss_kib = max_rss / 1024 if sys.platform == "darwin" else max_rss  # macOS counts bytes, Linux KiB
    summary["peak_rss_mib"] = round(max_rss_kib / 1024, 1)
    stdout = (run_dir / "stdout.txt").read_text()
    counts = re.search(r"policy lag of the trained rollouts \(versions: count\): (\{.*\})", stdout)
    if counts and summary["lag"]:  # vaco_async_mp.py's lag distribution over the rollouts it trained on
        summary["lag"]["rollouts"] = {str(k): v for k, v in ast.literal_eval(counts.group(1)).items()}
    command = shlex.join(["python", os.path.relpath(script, ROOT), *cmd[2:]])
    summary.update(wall_s=round(time.time() - start, 1), cmd=command)
    summaries.mkdir(parents=True, exist_ok=True)
    summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    numbers = (
        f"accuracy {summary['accuracy_first']:.3f} -> {summary['accuracy_final']:.3f} auc {summary['accuracy_auc']:.3f}"
        if is_llm(script)
        else f"final {summary['final']:.1f} auc {summary['auc']:.1f} sps {summary['sps']:.0f}"
    )
    print(f"done {tag}: {numbers} wall {summary['wall_s']:.0f}s peak {summary['peak_rss_mib']:.0f} MiB", flush=True)
    return tag, summary


def is_llm(script):
    return "llm" in Path(script).name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-ids", nargs="+", default=None, help="default CartPole-v1 (the LLM has none: see above)")
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=list(METHODS), help="default: every method the script takes"
    )
    parser.add_argument(
        "--lags",
        nargs="+",
        default=["0", "4", "16"],
        help="--policy-lag values (vaco_classic.py, vaco_llm_math.py), or 'async' for vaco_async_mp.py's real lag",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        help="sets of flags to run each method with: NAME=VALUE[,NAME=VALUE...] or 'default'",
    )
    parser.add_argument(
        "--extra",
        default="",
        help="more flags for every run, not part of the run's name (use a separate --out), e.g. '--total-timesteps 1000000'",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark")
    parser.add_argument(
        "--summaries",
        type=Path,
        default=ROOT / "tests" / "results" / "summaries",
        help="one {run}.json per finished run: read to resume and to make the tables",
    )
    parser.add_argument("--script", type=Path, default=ROOT / "vaco_classic.py")
    parser.add_argument("--per-seed", action="store_true", help="also print one row per seed")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: the tables from the summaries there are, and the runs still missing",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="also write {name}.md and {name}_return_vs_lag.png (LLM: {name}_accuracy.png) there (e.g. tests/results)",
    )
    parser.add_argument(
        "--results-name", default="{env}", help="the {name} of the files under --results-dir; {env} in it becomes the env id"
    )
    args = parser.parse_args()
    args.script = args.script.resolve()  # the runs start in their own folders

    extra = with_absolute_paths(args.extra.split())
    is_async = "async" in args.script.name
    if any((lag == "async") != is_async or (lag != "async" and not lag.isdigit()) for lag in args.lags):
        raise SystemExit(
            f"--lags: {args.script.name} takes "
            + ("only 'async' (its lag is measured, not set)" if is_async else "integers >= 0 (--policy-lag values)")
            + f"; got {' '.join(args.lags)}"
        )
    args.lags = [lag if is_async else int(lag) for lag in args.lags]
    flags, losses = script_flags(args.script)
    takes = [method for method in METHODS if unknown_flag(METHODS[method], flags, losses) is None]
    args.methods = args.methods or takes
    for method in args.methods:  # fail on a method or variant the script cannot run before any run starts
        if method not in takes:
            raise SystemExit(
                f"--methods: {args.script.name} does not take {method} "
                f"({unknown_flag(METHODS[method], flags, losses)}); it takes {' '.join(takes)}"
            )
    for variant in args.variants:
        if unknown := unknown_flag(variant_flags(variant), flags, losses):
            raise SystemExit(f"--variants: {args.script.name} does not take {unknown} (variant {variant})")
    if is_llm(args.script) and args.env_ids:
        raise SystemExit(f"--env-ids: {args.script.name} has no environment; its runs are named after its --dataset")
    args.env_ids = [llm_data_name(extra)] if is_llm(args.script) else args.env_ids or ["CartPole-v1"]
    names = [run_name(m, v) for m in args.methods for v in args.variants]
    default_steps = 500000  # vaco_classic.py's default --total-timesteps

    def total_steps_of(env_id, flags):
        return int(flags[flags.index("--total-timesteps") + 1]) if "--total-timesteps" in flags else default_steps

    summaries = args.summaries / extra_name(extra) if extra else args.summaries  # other flags, other results
    jobs = [
        (e, m, v, lag, s, extra)
        for e in args.env_ids
        for lag in args.lags
        for s in args.seeds
        for m in args.methods
        for v in args.variants
    ]
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(
            pool.map(lambda job: run_one(job, args.out, summaries, args.script, total_steps_of, args.report_only), jobs)
        )
    print(f"\n{len(jobs)} runs, wall time of this invocation {time.time() - start:.0f}s\n")
    missing = [tag for tag, r in results.items() if r is None]

    command = "python tests/benchmark_lag.py " + shlex.join(a for a in sys.argv[1:] if a != "--report-only")
    for env_id in args.env_ids:
        if is_llm(args.script):
            report = llm_markdown_report(results, env_id, names, args.lags, args.seeds, command)
        else:
            report = markdown_report(results, env_id, names, args.lags, args.seeds, args.per_seed, command)
        env_missing = [tag for tag in missing if tag.startswith(f"{env_id}__")]
        if env_missing:  # a grid spread over several sittings: say what the tables do not have yet
            env_runs = sum(tag.startswith(f"{env_id}__") for tag in results)
            report += (
                f"\nNo summary yet for {len(env_missing)} of the grid's {env_runs} runs: " + ", ".join(env_missing) + "\n"
            )
        print(report)
        if args.results_dir is not None:
            args.results_dir.mkdir(parents=True, exist_ok=True)
            stem = args.results_name.format(env=env_id)
            (args.results_dir / f"{stem}.md").write_text(report)
            if is_llm(args.script):
                plot_llm_accuracy(results, env_id, names, args.lags, args.seeds, args.results_dir / f"{stem}_accuracy.png")
            elif len(args.lags) > 1 and not is_async:  # a plot against the lag needs more than one lag
                plot_against_lag(results, env_id, names, args.lags, args.seeds, args.results_dir / f"{stem}_return_vs_lag.png")
            if not is_llm(args.script) and sum(delta_of(v, 0.0) is not None for v in args.variants) > 1:  # a delta sweep
                default = float(re.search(r"tv_delta: float = ([\d.e-]+)", args.script.read_text()).group(1))
                plot_against_delta(
                    results,
                    env_id,
                    args.methods,
                    args.variants,
                    args.lags,
                    args.seeds,
                    default,
                    args.results_dir / f"{stem}_auc_vs_delta.png",
                )


def seed_results(results, env_id, method, lag, seeds):
    return [r for r in (results.get(run_tag(env_id, method, "default", lag, s)) for s in seeds) if r is not None]


def lag_text(r):
    """'mean (max)' of the run's logged lag, with the 10/50/90% quantiles of its per-iteration mean when it varies."""
    lag = r.get("lag")
    if not lag:
        return "–"
    q10, q50, q90 = lag["q10_50_90"]
    spread = f", q10/50/90 {q10:.1f}/{q50:.1f}/{q90:.1f}" if q10 != q90 else ""
    rollouts = lag.get("rollouts")  # async runs: rollouts trained on per lag, e.g. "rollouts by lag 0: 4, 1: 65"
    by_lag = ", rollouts by lag " + ", ".join(f"{k}: {v}" for k, v in rollouts.items()) if rollouts else ""
    return f"{lag['mean']:.2f} (max {lag['max']:.0f}{spread}{by_lag})"


STD_NOTE = "mean ± sample standard deviation (ddof = 1) over the seeds in the last column (one seed: its value alone)"


def sample_std(values):
    """The spread the tables and plots show: the sample standard deviation (ddof = 1); 0 for a single value.

    np.std's default (ddof = 0) understates the spread of 3 seeds by 18% and of 2 seeds by 29%."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_std(values, digits=1):
    """'mean ± sample std' of a table cell, or the value alone for one seed (a spread needs two)."""
    mean = f"{np.mean(values):.{digits}f}"
    return f"{mean} ± {sample_std(values):.{digits}f}" if len(values) > 1 else mean


def markdown_report(results, env_id, methods, lags, seeds, per_seed, command):
    wall = sum(r["wall_s"] for m in methods for lag in lags for r in seed_results(results, env_id, m, lag, seeds))
    lines = [
        f"### {env_id}",
        "",
        f"`{command}` ({wall / 3600:.1f} h of run time, summed over the runs)",
        "",
        f"AUC and final return: {STD_NOTE}.",
        "",
        "| method | lag | AUC | final return | measured lag (mean) | SPS (median) | seeds |",
        "|-|-|-|-|-|-|-|",
    ]
    for method in methods:
        for lag in lags:
            rows = seed_results(results, env_id, method, lag, seeds)
            if rows:
                final, auc, sps = (np.array([r[k] for r in rows]) for k in ("final", "auc", "sps"))
                mean_lag = [r["lag"]["mean"] for r in rows if r.get("lag")]
                lag_mean = f"{np.mean(mean_lag):.2f}" if mean_lag else "–"
                lines.append(
                    f"| {method} | {lag} | {mean_std(auc)} | {mean_std(final)} | {lag_mean} | "
                    f"{np.median(sps):.0f} | {len(rows)} |"
                )
    gated = [
        (method, lag, [r["gate"] for r in seed_results(results, env_id, method, lag, seeds) if r.get("gate")])
        for method in methods
        for lag in lags
    ]
    if any(stats for _, _, stats in gated):  # runs summarized since the summaries record it
        lines += [
            "",
            "What the filter did, per iteration then averaged over the run and the seeds: the share of "
            "minibatches whose mean|r − 1| exceeded the bound (gate closed), the share of samples "
            "dropped, the lag ½ mean|π_T/β − 1| (`align/tv_behavior`), the move ½ mean|r − 1| "
            "(`losses/tv`) and the bound in L1 units (`charts/tv_delta`; – where the run did not log it).",
            "",
            "| method | lag | gate closed | samples dropped | lag TV | move TV | bound | seeds |",
            "|-|-|-|-|-|-|-|-|",
        ]
        for method, lag, stats in gated:
            if stats:
                mean = {k: f"{np.mean([g[k] for g in stats]):.3f}" if all(k in g for g in stats) else "–" for k in GATE_KEYS}
                lines.append(
                    f"| {method} | {lag} | {mean['closed']} | {mean['dropped']} | {mean['tv_behavior']} | "
                    f"{mean['tv']} | {mean['tv_delta']} | {len(stats)} |"
                )
    if per_seed:
        lines += ["", "| method | lag | seed | AUC | final | measured lag | SPS | wall s |", "|-|-|-|-|-|-|-|-|"]
        for method in methods:
            for lag in lags:
                for s in seeds:
                    r = results.get(run_tag(env_id, method, "default", lag, s))
                    if r is not None:
                        lines.append(
                            f"| {method} | {lag} | {s} | {r['auc']:.1f} | {r['final']:.1f} | {lag_text(r)} "
                            f"| {r['sps']:.0f} | {r['wall_s']:.0f} |"
                        )
    return "\n".join(lines) + "\n"


LLM_COLUMNS = {  # the LLM table's columns after method and lag: heading -> a run's number
    "accuracy AUC": lambda r: r["accuracy_auc"],
    "final accuracy": lambda r: r["accuracy_final"],
    "training reward": lambda r: r["reward_mean"],
    "gate closed": lambda r: r["gate"].get("closed", np.nan),
    "tokens dropped": lambda r: r["gate"].get("dropped", np.nan),
    "lag TV": lambda r: r["gate"].get("tv_behavior", np.nan),
}


def llm_markdown_report(results, data_name, methods, lags, seeds, command):
    """The LLM lag study's table: per method and lag the mean ± sample std over the seeds of each LLM_COLUMNS number,
    then one row per seed with its accuracy curve, measured lag, numerical floor, peak memory and wall time."""
    runs = [r for m in methods for lag in lags for r in seed_results(results, data_name, m, lag, seeds)]
    wall = sum(r["wall_s"] for r in runs)
    lines = [
        f"### vaco_llm_math.py on {data_name}: greedy accuracy against the policy lag",
        "",
        f"`{command}` ({wall / 3600:.1f} h of run time, summed over the runs)",
        "",
        f"Each cell: {STD_NOTE}. Accuracy AUC: the greedy accuracy (`eval/accuracy`) averaged over the steps it spans "
        "(trapezoid); training reward: the sampled reward (`charts/reward_mean`); per step then averaged over the run: "
        "the share of minibatches whose gate closed (`losses/filter_gate_frac`), of tokens dropped "
        "(`losses/filtered_frac`) and the lag ½ mean|π_T/β − 1| (`align/tv_behavior`).",
        "",
        "| method | lag | " + " | ".join(LLM_COLUMNS) + " | seeds |",
        "|-|-|" + "-|" * len(LLM_COLUMNS) + "-|",
    ]
    for method in methods:
        for lag in lags:
            rows = seed_results(results, data_name, method, lag, seeds)
            if rows:
                values = [[number(r) for r in rows] for number in LLM_COLUMNS.values()]
                cells = ["–" if np.isnan(column).all() else mean_std(column, digits=3) for column in values]
                lines.append(f"| {method} | {lag} | " + " | ".join(cells) + f" | {len(rows)} |")
    lines += [
        "",
        "| method | lag | seed | greedy accuracy (step: value) | measured lag | floor (L1) | peak RSS (GiB) | wall (min) |",
        "|-|-|-|-|-|-|-|-|",
    ]
    for method in methods:
        for lag in lags:
            for seed in seeds:
                r = results.get(run_tag(data_name, method, "default", lag, seed))
                if r is not None:
                    curve = ", ".join(f"{step}: {value:.3f}" for step, value in r["accuracy"]) or "– (no evaluation)"
                    floor = "–" if r.get("numerical_floor") is None else f"{r['numerical_floor']:.1e}"
                    lines.append(
                        f"| {method} | {lag} | {seed} | {curve} | {lag_text(r)} | {floor} | "
                        f"{r['peak_rss_mib'] / 1024:.1f} | {r['wall_s'] / 60:.1f} |"
                    )
    return "\n".join(lines) + "\n"


def plot_llm_accuracy(results, data_name, methods, lags, seeds, path):
    """Greedy accuracy against the learner step, a colour per lag and a line style per method: each seed a thin line,
    their mean a thick one with a band of ± the sample std over the seeds (at the steps every seed evaluated)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib); the tables are written anyway")
        return
    runs = [r for method in methods for lag in lags for r in seed_results(results, data_name, method, lag, seeds)]
    if not any(r["accuracy"] for r in runs):
        print("no plot: no run of the grid has a summary with an evaluation yet (--eval-samples 0 evaluates nothing)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in methods:
        for lag in lags:
            curves = [dict(r["accuracy"]) for r in seed_results(results, data_name, method, lag, seeds) if r["accuracy"]]
            if not curves:
                continue
            shared_steps = sorted(set.intersection(*(set(curve) for curve in curves)))
            by_step = np.array([[curve[step] for curve in curves] for step in shared_steps])
            mean = by_step.mean(axis=1)
            spread = np.array([sample_std(values) for values in by_step])
            style = {"color": f"C{lags.index(lag) % 10}", "linestyle": ["-", "--", ":", "-."][methods.index(method) % 4]}
            label = f"{method}, lag {lag} ({len(curves)} seeds)"
            ax.plot(shared_steps, mean, marker="o", linewidth=2, label=label, **style)
            ax.fill_between(shared_steps, mean - spread, mean + spread, color=style["color"], alpha=0.12)
            for curve in curves:
                ax.plot(list(curve), list(curve.values()), linewidth=0.6, alpha=0.5, **style)
    ax.set(
        xlabel="learner step",
        ylabel="greedy accuracy (eval/accuracy)",
        title=f"vaco_llm_math.py on {data_name}: mean ± sample std over seeds",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def delta_of(variant, default_delta):
    """The --tv-delta of a variant that sets it alone ('default': the script's), else None."""
    match = re.fullmatch(r"tv-delta=([0-9.e+-]+)", variant)
    return default_delta if variant == "default" else float(match.group(1)) if match else None


def plot_against_delta(results, env_id, methods, variants, lags, seeds, default_delta, path):
    """AUC against --tv-delta (log scale), one line per method and lag (mean ± sample std over the seeds); the other
    variants (e.g. tv-delta-rule=forward) as single markers at the delta they start from."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        for lag in lags:

            def auc(variant, method=method, lag=lag):
                return [r["auc"] for r in seed_results(results, env_id, run_name(method, variant), lag, seeds)]

            sweep = sorted((delta_of(v, default_delta), auc(v)) for v in variants if delta_of(v, default_delta) is not None)
            sweep = [(delta, a) for delta, a in sweep if a]
            line = ax.errorbar(
                [d for d, _ in sweep],
                [np.mean(a) for _, a in sweep],
                yerr=[sample_std(a) for _, a in sweep],
                marker="o",
                capsize=3,
                label=f"{method}, lag {lag}",
            )
            for k, variant in enumerate(v for v in variants if delta_of(v, default_delta) is None):
                if a := auc(variant):  # beside the sweep's point at the delta it starts from
                    ax.errorbar(
                        [default_delta * 1.06],
                        [np.mean(a)],
                        yerr=[sample_std(a)],
                        marker="*^sD"[k % 4],
                        markersize=11,
                        capsize=3,
                        color=line[0].get_color(),
                        label=f"{method}+{variant}, lag {lag}",
                    )
    deltas = sorted(delta_of(v, default_delta) for v in variants if delta_of(v, default_delta) is not None)
    ax.set(
        xscale="log",
        xlabel="--tv-delta (bound on mean|r - 1|)",
        ylabel="AUC (mean ± sample std over seeds)",
        title=f"{env_id}: AUC against delta",
    )
    ax.set_xticks(deltas, [f"{d:g}" for d in deltas])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_against_lag(results, env_id, methods, lags, seeds, path):
    """AUC and final return against --policy-lag, one line per method (mean ± sample std over the seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib); the tables are written anyway")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("auc", "final"), ("area under the return curve", "final return")):
        for i, method in enumerate(methods):
            points = [(lag, [r[key] for r in seed_results(results, env_id, method, lag, seeds)]) for lag in lags]
            points = [(lag, v) for lag, v in points if v]
            shift = 0.15 * (i - (len(methods) - 1) / 2)  # side by side, so that the error bars do not overlap
            if points:
                ax.errorbar(
                    [lag + shift for lag, _ in points],
                    [np.mean(v) for _, v in points],
                    yerr=[sample_std(v) for _, v in points],
                    marker="o",
                    capsize=3,
                    label=method,
                )
        ax.set(
            xlabel="--policy-lag (iterations)",
            ylabel="episodic return (mean ± sample std over seeds)",
            title=f"{env_id}: {title}",
        )
        ax.set_xticks(lags)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
