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
study resumes from what is committed, on any machine); a run with a summary is not run again, and the tables are made
from the summaries. --report-only runs nothing: it makes the tables of a grid from the summaries there are and lists
the runs still missing. Event files and stdout go to --out (one folder per run, named after the env, method, variant
flags, lag and seed). Per run the summary records:
  final     mean episodic return over the last 10% of the steps
  auc       area under the return curve divided by the steps it spans (trapezoid over the logged episodes), i.e. the
            average return during training: it tells apart runs that all end at CartPole's cap of 500
  sps       the last charts/SPS the run logged; wall_s, its wall time
  lag       the policy lag of its batches (charts/policy_lag): mean, max and the 10/50/90% quantiles of the
            per-iteration mean (for --policy-lag K they are all K); for vaco_async_mp.py also how many of the
            rollouts it trained on had each lag ('rollouts', from the line the script prints at the end)
  cmd       the exact command, from the repository's root
The tables' ± is the sample standard deviation over the seeds (ddof = 1; np.std's default, ddof = 0, understates
the spread of 3 seeds by 18%). With --results-dir it also writes a markdown table and a plot of the returns against
the lag per environment (matplotlib is needed for the plot only, and imported only then).
"""

import argparse
import ast
import json
import os
import re
import shlex
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


def summarize(run_dir, total_steps):
    scalars = read_scalars(run_dir)  # {tag: [(step, value), ...]}

    def series(key):
        points = np.array(scalars.get(key, []), dtype=float).reshape(-1, 2)
        return points[:, 0], points[:, 1]

    steps, returns = series("charts/episodic_return")
    _, sps = series("charts/SPS")
    _, lags = series("charts/policy_lag")
    _, lag_max = series("charts/policy_lag_max")
    last = steps >= 0.9 * total_steps
    auc = np.trapezoid(returns, steps) / (steps[-1] - steps[0]) if len(steps) > 1 else float("nan")
    lag = (
        {
            "mean": float(lags.mean()),
            "max": float(max(lags.max(), lag_max.max(initial=0))),
            "q10_50_90": [float(q) for q in np.quantile(lags, [0.1, 0.5, 0.9])],
        }
        if len(lags)
        else None
    )
    # what the filter did, averaged over the iterations: share of minibatches with the gate closed, share of samples
    # dropped, the backward lag 0.5 mean|pi_T/beta - 1|, the forward move 0.5 mean|r - 1| and the bound in use
    gate = {name: float(series(key)[1].mean()) for name, key in GATE_KEYS.items() if len(series(key)[1])}
    return {
        "final": float(returns[last].mean()) if last.any() else float("nan"),
        "auc": float(auc),
        "sps": float(sps[-1]) if len(sps) else float("nan"),
        "episodes": int(len(returns)),
        "lag": lag,
        "gate": gate,
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
    """['--total-timesteps', '1000000', '--num-envs', '1'] -> 'total-timesteps=1000000,num-envs=1'."""
    flags = " ".join(extra).replace(" --", ",--").split(",")
    return ",".join(flag.lstrip("-").replace(" ", "=") for flag in flags)


def run_name(method, variant):
    return method if variant == "default" else f"{method}+{variant}"


def run_tag(env_id, method, variant, lag, seed):
    return f"{env_id}__{run_name(method, variant)}__lag{lag}__s{seed}"


def run_one(job, out, summaries, script, total_steps_of, report_only=False):
    env_id, method, variant, lag, seed, extra = job
    tag = run_tag(env_id, method, variant, lag, seed)
    summary_file = summaries / f"{tag}.json"
    if summary_file.exists():
        return tag, json.loads(summary_file.read_text())
    if report_only:
        return tag, None
    run_dir = out / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    lag_flags = [] if lag == "async" else ["--policy-lag", str(lag)]
    cmd = [
        sys.executable,
        str(script),
        "--env-id",
        env_id,
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
    with open(run_dir / "stdout.txt", "w") as log:
        result = subprocess.run(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        print(f"FAILED {tag} (exit {result.returncode}); see {run_dir / 'stdout.txt'}", flush=True)
        return tag, None
    summary = summarize(run_dir, total_steps_of(env_id, extra))
    stdout = (run_dir / "stdout.txt").read_text()
    counts = re.search(r"policy lag of the trained rollouts \(versions: count\): (\{.*\})", stdout)
    if counts and summary["lag"]:  # vaco_async_mp.py's lag distribution over the rollouts it trained on
        summary["lag"]["rollouts"] = {str(k): v for k, v in ast.literal_eval(counts.group(1)).items()}
    command = shlex.join(["python", os.path.relpath(script, ROOT), *cmd[2:]])
    summary.update(wall_s=round(time.time() - start, 1), cmd=command)
    summaries.mkdir(parents=True, exist_ok=True)
    summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"done {tag}: final {summary['final']:.1f} auc {summary['auc']:.1f} sps {summary['sps']:.0f} "
        f"wall {summary['wall_s']:.0f}s",
        flush=True,
    )
    return tag, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-ids", nargs="+", default=["CartPole-v1"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--lags",
        nargs="+",
        default=["0", "4", "16"],
        help="--policy-lag values of vaco_classic.py, or 'async' for vaco_async_mp.py's real lag",
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
        help="also write {name}.md and {name}_return_vs_lag.png there (e.g. tests/results)",
    )
    parser.add_argument(
        "--results-name", default="{env}", help="the {name} of the files under --results-dir; {env} in it becomes the env id"
    )
    args = parser.parse_args()
    args.script = args.script.resolve()  # the runs start in their own folders

    extra = args.extra.split()
    is_async = "async" in args.script.name
    if any((lag == "async") != is_async or (lag != "async" and not lag.isdigit()) for lag in args.lags):
        raise SystemExit(
            f"--lags: {args.script.name} takes "
            + ("only 'async' (its lag is measured, not set)" if is_async else "integers >= 0 (--policy-lag values)")
            + f"; got {' '.join(args.lags)}"
        )
    args.lags = [lag if is_async else int(lag) for lag in args.lags]
    for variant in args.variants:
        variant_flags(variant)  # fail on a malformed variant before any run starts
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
            if len(args.lags) > 1 and not is_async:  # a plot against the lag needs more than one lag
                plot_against_lag(results, env_id, names, args.lags, args.seeds, args.results_dir / f"{stem}_return_vs_lag.png")
            if sum(delta_of(v, 0.0) is not None for v in args.variants) > 1:  # a delta sweep
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


def mean_std(values):
    """'mean ± sample std' of a table cell, or the value alone for one seed (a spread needs two)."""
    return f"{np.mean(values):.1f} ± {sample_std(values):.1f}" if len(values) > 1 else f"{np.mean(values):.1f}"


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
