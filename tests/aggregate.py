"""The README's "Results at a glance": how each method does across the MuJoCo tasks, with 95% confidence intervals.

    python tests/aggregate.py                   # print the README's block (the README holds exactly this)
    python tests/aggregate.py --plot            # also draw tests/results/at_a_glance.png (needs matplotlib)
    python tests/aggregate.py --full            # print the studies page's tables: every aggregate, and every P
    python tests/aggregate.py --random-returns  # measure the random policy's return again (RANDOM_RETURN)

Is VACO more robust to policy lag than PPO? For each lag setting (simulated lag 0 and 8 on Hopper-v5, HalfCheetah-v5
and Walker2d-v5; real asynchronous lag on Hopper-v5) and each method, the score of a run (its final return, the
paper's metric, or its AUC, see tests/benchmark_lag.py) is normalized per task: 0 is a uniformly random policy's
return, 1 the mean of `ppo-noalign` (naive asynchronous PPO-clip) at lag 0 on that task (real async: Hopper's).
Across tasks and seeds: the interquartile mean (IQM), the median and the mean of the task means, the optimality gap
(how far below 1 the runs are, on average) and the probability of improvement of `vaco` over each baseline, P(a run of
`vaco` scores higher than a run of the baseline on the same task) + half the probability of a tie, averaged over the
tasks. Each comes with a 95% stratified bootstrap confidence interval (rliable: runs are resampled within each task;
the percentile interval of REPS resamples from the fixed seed BOOTSTRAP_SEED).

Which runs count: a (task, method, setting) cell with fewer than 2 seeds is left out, and so is a task whose
normalization (`ppo-noalign` at lag 0) has fewer than 2 seeds; within a setting, a task is left out of every method's
aggregate unless every method with runs there has it, so that a column compares the same tasks. The stratified
bootstrap needs the same number of runs
on every task of an aggregate, so a method's aggregate takes as many seeds of each task as its task with the fewest
has, the lowest-numbered ones; the tables say how many seeds each task has and how many were used. Nothing is run: the
numbers are read from tests/results/summaries (tests/test_readme.py regenerates the tables and compares them with the
pages). rliable, arch and pandas are needed here only, not by the scripts.
"""

import argparse
import functools
import json
import re
from pathlib import Path

import numpy as np
from rliable import library as rly

ROOT = Path(__file__).resolve().parents[1]
SUMMARIES = ROOT / "tests" / "results" / "summaries"
MUJOCO = "total-timesteps=500000,num-envs=1,num-steps=2048,num-minibatches=32,update-epochs=10,learning-rate=3e-4,ent-coef=0.0"
ASYNC = (
    "num-actors=4,num-envs-per-actor=1,num-steps=512,rollouts-per-batch=4,num-minibatches=32,update-epochs=10,"
    "learning-rate=3e-4,ent-coef=0.0,total-timesteps=500000"
)
TASKS = ["Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"]
# (name, summaries folder, the lag in the file names, tasks)
SETTINGS = [
    ("lag 0", MUJOCO, "0", TASKS),
    ("lag 8", MUJOCO, "8", TASKS),
    ("real async", ASYNC, "async", ["Hopper-v5"]),
]
METHODS = ["vaco", "ppo-kl", "ppo-noalign", "spo-noalign", "impala"]
README_BASELINES = ["ppo-kl", "ppo-noalign"]  # the README's P rows, PPO's two forms (the README has little room)
REFERENCE = ("ppo-noalign", "0")  # score 1: this method's mean at this lag, per task, over all its seeds
# Mean return of uniformly random actions (action_space.sample()), 100 episodes of gymnasium 1.4's env with its
# default time limit, episode i reset with seed i, the action space seeded 0: `python tests/aggregate.py --random-returns`.
RANDOM_RETURN = {"Hopper-v5": 16.67, "HalfCheetah-v5": -282.49, "Walker2d-v5": 1.77}
MIN_SEEDS = 2
REPS = 2000
BOOTSTRAP_SEED = 0
SCORES = [("final", "final"), ("auc", "AUC")]
AGGREGATES = ["IQM", "median", "mean", "optimality gap"]


def seeds(summaries, folder, env_id, method, lag):
    """The seeds of a cell that have a summary, in order."""
    names = (path.name for path in (summaries / folder).glob(f"{env_id}__{method}__lag{lag}__s*.json"))
    return sorted(int(m.group(1)) for name in names if (m := re.fullmatch(r".*__s(\d+)\.json", name)))


def score(summaries, folder, env_id, method, lag, seed, key):
    return json.loads((summaries / folder / f"{env_id}__{method}__lag{lag}__s{seed}.json").read_text())[key]


def normalizer(summaries, env_id, key):
    """(random return, the reference's mean), or None while the reference has fewer than MIN_SEEDS seeds."""
    method, lag = REFERENCE
    reference_seeds = seeds(summaries, MUJOCO, env_id, method, lag)
    if len(reference_seeds) < MIN_SEEDS:
        return None
    reference = np.mean([score(summaries, MUJOCO, env_id, method, lag, s, key) for s in reference_seeds])
    return RANDOM_RETURN[env_id], reference


def normalize(returns, random_return, reference):
    return (np.asarray(returns, dtype=float) - random_return) / (reference - random_return)


def runs(summaries, setting, method, key, tasks=None):
    """A method's normalized scores in a setting, runs x tasks, and the seed counts: (scores or None, tasks used,
    {task: seeds it has}, seeds used per task). `tasks` narrows the tasks (a comparison uses those both methods have)."""
    _, folder, lag, setting_tasks = setting
    available = {env_id: seeds(summaries, folder, env_id, method, lag) for env_id in setting_tasks}
    usable = [
        env_id
        for env_id in (tasks if tasks is not None else setting_tasks)
        if len(available[env_id]) >= MIN_SEEDS and normalizer(summaries, env_id, key) is not None
    ]
    if not usable:
        return None, [], {t: len(s) for t, s in available.items()}, 0
    used = min(len(available[env_id]) for env_id in usable)  # the stratified bootstrap needs as many runs per task
    columns = [
        normalize(
            [score(summaries, folder, env_id, method, lag, s, key) for s in available[env_id][:used]],
            *normalizer(summaries, env_id, key),
        )
        for env_id in usable
    ]
    return np.stack(columns, axis=1), usable, {t: len(s) for t, s in available.items()}, used


def aggregates(scores):
    """IQM, median, mean and optimality gap of a runs x tasks array, as rliable's metrics define them (a test checks
    that they agree); written with numpy alone because the bootstrap calls this REPS times per cell, and rliable's
    own (scipy's trim_mean among them) cost several times as much."""
    ordered = np.sort(scores, axis=None)
    cut = int(0.25 * ordered.size)  # scipy.stats.trim_mean's cut: the whole runs below 25%, and as many above
    task_means = scores.mean(axis=0)
    iqm = ordered[cut : ordered.size - cut].mean()
    optimality_gap = 1 - np.minimum(scores, 1).mean()
    return np.array([iqm, np.median(task_means), task_means.mean(), optimality_gap])


def probability_of_improvement(x, y):
    """P(X > Y) + P(X = Y) / 2 for a run X of x and a run Y of y on the same task, averaged over the tasks (runs x
    tasks arrays); rliable's metric without its cost (it runs a Mann-Whitney U test per task and resample)."""
    pairs = x[:, None, :] - y[None, :, :]
    return np.mean((np.sign(pairs) + 1) / 2)


def interval(scores, func):
    """rliable's stratified bootstrap of func over scores (an array, or a list of arrays resampled independently):
    the point estimate and the 95% percentile interval (lows, highs), the same resamples on every call."""
    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)  # rliable draws the resamples from numpy's global generator, whatever random_state
    try:
        point, ci = rly.get_interval_estimates({"x": scores}, func, reps=REPS)
    finally:
        np.random.set_state(state)
    return np.atleast_1d(point["x"]), ci["x"].reshape(2, -1)


@functools.cache  # the README's table, the studies page's and the plot share one bootstrap
def report(summaries=SUMMARIES):
    """Every number of the tables: {(setting, method, key): (result, seeds text)} for the aggregates and
    {(setting, baseline, key): (result, tasks and seeds text)} for the probability that `vaco` improves on it; a
    result is interval()'s (the estimates, (lows, highs)), one value per aggregate or one P, or None without runs."""
    aggregate, improvement = {}, {}
    for setting in SETTINGS:
        for key, _ in SCORES:
            # the tasks that every method with runs in this setting has: the rows of a column then compare the same tasks
            with_runs = [tasks for tasks in (runs(summaries, setting, method, key)[1] for method in METHODS) if tasks]
            shared = [task for task in setting[3] if all(task in tasks for tasks in with_runs)]
            for method in METHODS:
                scores, tasks, counts, used = runs(summaries, setting, method, key, shared)
                point = interval(scores, aggregates) if scores is not None else None
                aggregate[setting[0], method, key] = (point, seeds_text(counts, used, tasks))
            for baseline in METHODS[1:]:
                tasks = runs(summaries, setting, baseline, key)[1]
                vaco, tasks, _, vaco_used = runs(summaries, setting, "vaco", key, tasks)
                other, _, _, other_used = runs(summaries, setting, baseline, key, tasks)
                point = interval([vaco, other], probability_of_improvement) if tasks else None
                text = f"{len(tasks)} task{'s' * (len(tasks) != 1)}, {vaco_used} against {other_used}" if tasks else ""
                improvement[setting[0], baseline, key] = (point, text)
    return aggregate, improvement


def seeds_text(counts, used, tasks):
    """Seeds per task (in TASKS order, `/` between them; in parentheses a task left out of the aggregate although it
    has runs), then how many of each used task were used."""
    shown = [str(n) if task in tasks or n == 0 else f"({n})" for task, n in counts.items()]
    return "/".join(shown) + (f" → {used}" if used else " → –")


def estimate(point):
    """'0.93 [0.85, 1.02]' for each aggregate of a bootstrap result, '–' for a missing one."""
    if point is None:
        return ["–"] * len(AGGREGATES)
    values, (lows, highs) = point
    return [f"{v:.2f} [{lo:.2f}, {hi:.2f}]".replace("-", "−") for v, lo, hi in zip(values, lows, highs)]


def table(summaries=SUMMARIES):
    """The README's block, between its two marker comments: the IQM of each method and the probability that `vaco`
    improves on each form of PPO, a column per setting and score, then the seeds of each cell."""
    aggregate, improvement = report(summaries)
    columns = [(name, key) for name, *_ in SETTINGS for key, _ in SCORES]
    labels = dict(SCORES)
    lines = [
        "| IQM | " + " | ".join(f"{name}, {labels[key]}" for name, key in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for method in METHODS:
        cells = [estimate(aggregate[name, method, key][0])[0] for name, key in columns]
        lines.append(f"| `{method}` | {' | '.join(cells)} |")
    for baseline in README_BASELINES:
        cells = [estimate(improvement[name, baseline, key][0])[0] for name, key in columns]
        lines.append(f"| P(`vaco` > `{baseline}`) | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n\n" + seeds_line(aggregate) + "\n"


def seeds_line(aggregate):
    """Seeds per task (Hopper/HalfCheetah/Walker2d) → how many of each were used: per setting, the counts most
    methods have, then each other count with its methods; the settings with the same counts together."""
    settings = {}
    for name, *_ in SETTINGS:
        by_text = {}
        for method in METHODS:
            by_text.setdefault(aggregate[name, method, "final"][1], []).append(method)
        common = max(by_text, key=lambda text: len(by_text[text]))  # the first of the largest groups
        others = [f"{' and '.join(methods)} {text}" for text, methods in by_text.items() if text != common]
        settings.setdefault(", ".join([common] + others), []).append(name)
    return (
        "Seeds per task (Hopper/HalfCheetah/Walker2d; (n): left out) → used of each; "
        + " · ".join(f"{' and '.join(names)}: {text}" for text, names in settings.items())
        + "."
    )


def full_table(summaries=SUMMARIES):
    """The studies page's table: every aggregate of both scores, then the probabilities of improvement."""
    aggregate, improvement = report(summaries)
    header = "| setting | method | score | " + " | ".join(AGGREGATES) + " | seeds |"
    lines = [header, "|---" * (len(AGGREGATES) + 4) + "|"]
    for name, *_ in SETTINGS:
        for method in METHODS:
            for key, label in SCORES:
                point, text = aggregate[name, method, key]
                lines.append(f"| {name} | `{method}` | {label} | {' | '.join(estimate(point))} | {text} |")
    lines += ["", "| setting | `vaco` against | P(`vaco` > it), final | P(`vaco` > it), AUC | tasks, seeds of each |"]
    lines += ["|---|---|---|---|---|"]
    for name, *_ in SETTINGS:
        for baseline in METHODS[1:]:
            cells = [estimate(improvement[name, baseline, key][0])[0] for key, _ in SCORES]
            texts = {improvement[name, baseline, key][1] for key, _ in SCORES}
            lines.append(f"| {name} | `{baseline}` | {' | '.join(cells)} | {' or '.join(sorted(texts))} |")
    return "\n".join(lines) + "\n"


def plot(path, summaries=SUMMARIES):
    """An interval plot: one row per score, one column per aggregate and one for the probability of improvement;
    each bar spans the 95% interval, the tick is the point estimate; colors: methods, groups: settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregate, improvement = report(summaries)
    columns = AGGREGATES + ["P(vaco > baseline)"]
    fig, axes = plt.subplots(len(SCORES), len(columns), figsize=(3.0 * len(columns), 1.0 + 3.6 * len(SCORES)), sharey="row")
    labels = [f"{name}: {method}" for name, *_ in SETTINGS for method in METHODS]
    for row, (key, label) in enumerate(SCORES):
        for col, column in enumerate(columns):
            ax = axes[row, col]
            for y, (name, method) in enumerate((name, method) for name, *_ in SETTINGS for method in METHODS):
                if col < len(AGGREGATES):
                    point = aggregate[name, method, key][0]
                    values = None if point is None else (point[0][col], point[1][0][col], point[1][1][col])
                else:
                    point = improvement.get((name, method, key), (None,))[0]
                    values = None if point is None else (point[0][0], point[1][0][0], point[1][1][0])
                if values is None:
                    continue
                value, low, high = values
                color = f"C{METHODS.index(method)}"
                ax.barh(y, high - low, left=low, height=0.6, color=color, alpha=0.6)
                ax.plot([value, value], [y - 0.3, y + 0.3], color="k", linewidth=1.5)
            if column != "optimality gap":  # the level of `ppo-noalign` at lag 0, or a coin flip
                ax.axvline(0.5 if col == len(AGGREGATES) else 1.0, color="grey", linestyle="--", linewidth=0.8)
            if col == len(AGGREGATES):
                ax.set_xlim(-0.03, 1.03)
            for boundary in range(len(METHODS), len(labels), len(METHODS)):
                ax.axhline(boundary - 0.5, color="grey", linewidth=0.5)
            ax.set_title(f"{column}, {label}", fontsize=9)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
        axes[row, 0].invert_yaxis()  # the first setting on top (the row shares its y axis)
    fig.suptitle(
        "Normalized score (0: random policy, 1: ppo-noalign at lag 0): point estimates and 95% stratified bootstrap "
        f"intervals ({REPS} resamples); seeds per cell: see the table",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def random_return(env_id, episodes=100):
    """The mean return of uniformly random actions on a task, and its standard error: what RANDOM_RETURN holds."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(0)
    returns = []
    for episode in range(episodes):
        env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total += reward
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.mean(returns), np.std(returns, ddof=1) / np.sqrt(episodes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--plot",
        type=Path,
        nargs="?",
        const=ROOT / "tests" / "results" / "at_a_glance.png",
        default=None,
        help="also draw the interval plot (default path: tests/results/at_a_glance.png)",
    )
    parser.add_argument("--full", action="store_true", help="print the studies page's table (every aggregate)")
    parser.add_argument("--random-returns", action="store_true", help="measure the random policy's return per task")
    parser.add_argument("--summaries", type=Path, default=SUMMARIES, help="read the summaries from this folder")
    args = parser.parse_args()
    if args.random_returns:
        for env_id in TASKS:
            mean, stderr = random_return(env_id)
            print(f"{env_id}: {mean:.2f} ± {stderr:.2f} (standard error), 100 episodes")
        return
    print(full_table(args.summaries) if args.full else table(args.summaries), end="")
    if args.plot is not None:
        plot(args.plot, args.summaries)


if __name__ == "__main__":
    main()
