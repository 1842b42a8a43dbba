"""Per task at a glance: one table and one figure across every task studied, from the committed summaries (the
studies page's "Results at a glance" section; the README's aggregate across tasks is tests/aggregate.py's).

    python tests/results_at_a_glance.py            # print the per-task table (the studies page holds exactly this)
    python tests/results_at_a_glance.py --plot     # also draw tests/results/at_a_glance_per_task.png (matplotlib)
    python tests/results_at_a_glance.py --delta    # print the table of "Choosing δ" instead (README and studies page)
    python tests/results_at_a_glance.py --gates    # print what the gate did in the δ study (studies page)

For each task: the AUC (the average return during training, see tests/benchmark_lag.py) of `vaco`, `ppo-noalign`
(naive asynchronous PPO-clip) and `ppo-kl` (PPO with the KL penalty 0.1, the paper's baseline) without lag and at the
largest lag studied, as mean ± sample standard deviation (ddof = 1) over the seeds. Nothing is run: the numbers are
read from tests/results/summaries, which the studies of tests/results/README.md wrote, so the table cannot drift from
the data (tests/test_readme.py regenerates it and compares it with the studies page).
"""

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SUMMARIES = ROOT / "tests" / "results" / "summaries"
MUJOCO = "total-timesteps=500000,num-envs=1,num-steps=2048,num-minibatches=32,update-epochs=10,learning-rate=3e-4,ent-coef=0.0"
ASYNC = (
    "num-actors=4,num-envs-per-actor=1,num-steps=512,rollouts-per-batch=4,num-minibatches=32,update-epochs=10,"
    "learning-rate=3e-4,ent-coef=0.0,total-timesteps=500000"
)
METHODS = ["vaco", "ppo-noalign", "ppo-kl"]
SEEDS = [1, 2, 3]
# (task as the table names it, env id, summaries folder, lags: lag 0 and the largest; 'async' is the measured lag)
TASKS = [
    ("CartPole-v1, 500k steps", "CartPole-v1", "", ["0", "16"]),
    ("Acrobot-v1, 500k steps", "Acrobot-v1", "", ["0", "16"]),
    ("Hopper-v5, 500k steps", "Hopper-v5", MUJOCO, ["0", "8"]),
    ("HalfCheetah-v5, 500k steps", "HalfCheetah-v5", MUJOCO, ["0", "8"]),
    ("Hopper-v5, real async, 4 actors", "Hopper-v5", ASYNC, ["async"]),
]


def aucs(env_id, folder, method, lag):
    """The AUC of each seed that has a summary, in seed order."""
    files = [SUMMARIES / folder / f"{env_id}__{method}__lag{lag}__s{seed}.json" for seed in SEEDS]
    return [json.loads(f.read_text())["auc"] for f in files if f.exists()]


def cell(values):
    text = f"{np.mean(values):.0f} ± {np.std(values, ddof=1):.0f}" if len(values) > 1 else "–"
    return text.replace("-", "−")  # the README's minus sign


def lag_label(env_id, folder, lag):
    if lag != "async":
        return lag
    files = [SUMMARIES / folder / f"{env_id}__{method}__lag{lag}__s{seed}.json" for method in METHODS for seed in SEEDS]
    lags = [json.loads(f.read_text())["lag"]["mean"] for f in files if f.exists()]  # the runs of the row, no others
    return f"real, mean {np.mean(lags):.1f}"


def table():
    """The per-task table of the studies page's "Results at a glance"."""
    lines = ["| task | lag | `vaco` | `ppo-noalign` | `ppo-kl` | seeds |", "|---|---|---|---|---|---|"]
    for name, env_id, folder, lags in TASKS:
        for lag in lags:
            values = [aucs(env_id, folder, m, lag) for m in METHODS]
            best = max(range(len(METHODS)), key=lambda i: np.mean(values[i]))
            cells = [f"**{cell(v)}**" if i == best else cell(v) for i, v in enumerate(values)]
            seeds = sorted({len(v) for v in values})
            lines.append(f"| {name} | {lag_label(env_id, folder, lag)} | {' | '.join(cells)} | {'/'.join(map(str, seeds))} |")
    return "\n".join(lines) + "\n"


# "Choosing δ": its rows (label, the variant's name in the summaries) and columns (label, env id, lag), MuJoCo settings
DELTA_ROWS = [
    ("0.1", "vaco+tv-delta=0.1"),
    ("0.2 (default)", "vaco"),
    ("0.4", "vaco+tv-delta=0.4"),
    ("0.8", "vaco+tv-delta=0.8"),
    ("forward (δ = 0.2)", "vaco+tv-delta-rule=forward"),
]
DELTA_COLUMNS = [
    ("HalfCheetah, lag 0", "HalfCheetah-v5", "0"),
    ("lag 8", "HalfCheetah-v5", "8"),
    ("Hopper, lag 0", "Hopper-v5", "0"),
    ("lag 8", "Hopper-v5", "8"),
]


def delta_table():
    """AUC of each δ (and the forward bound) per task and lag, bold: the best mean of a column; a cell with fewer
    than 3 seeds says how many."""
    values = [[aucs(env_id, MUJOCO, variant, lag) for _, env_id, lag in DELTA_COLUMNS] for _, variant in DELTA_ROWS]
    best = [
        max(range(len(DELTA_ROWS)), key=lambda r: np.mean(values[r][c]) if values[r][c] else -np.inf)
        for c in range(len(DELTA_COLUMNS))
    ]
    lines = ["| δ | " + " | ".join(name for name, _, _ in DELTA_COLUMNS) + " |", "|---" * (len(DELTA_COLUMNS) + 1) + "|"]
    for r, (label, _) in enumerate(DELTA_ROWS):
        cells = [cell(v) + (f" ({len(v)} seeds)" if 1 < len(v) < len(SEEDS) else "") for v in values[r]]
        cells = [f"**{text}**" if best[c] == r else text for c, text in enumerate(cells)]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def gate_table():
    """What the filter did in each run of the δ table that logged it: per iteration, then averaged over the run and
    the seeds; the lag, the move and the bound in L1 units (2 x `align/tv_behavior`, 2 x `losses/tv`,
    `charts/tv_delta`) so that they read against δ. Rows: lag 8 first, then lag 0."""
    lines = ["| δ | task, lag | gate closed | samples dropped | lag, L1 | move, L1 | bound, L1 | seeds |", "|---" * 8 + "|"]
    for lag in ["8", "0"]:
        for label, variant in DELTA_ROWS:
            for env_id in ["HalfCheetah-v5", "Hopper-v5"]:
                files = [SUMMARIES / MUJOCO / f"{env_id}__{variant}__lag{lag}__s{seed}.json" for seed in SEEDS]
                gates = [json.loads(f.read_text()).get("gate") for f in files if f.exists()]
                gates = [gate for gate in gates if gate]
                if not gates:
                    continue
                mean = {key: np.mean([g[key] for g in gates if g.get(key) is not None]) for key in set().union(*gates)}
                lines.append(
                    f"| {label.replace(' (default)', '')} | {env_id.split('-')[0]}, {lag} | "
                    f"{mean['closed']:.2f} | {mean['dropped']:.2f} | {2 * mean['tv_behavior']:.2f} | "
                    f"{2 * mean['tv']:.2f} | {mean['tv_delta']:.2f} | {len(gates)} |"
                )
    return "\n".join(lines) + "\n"


def plot(path):
    """One panel per task: each method's AUC without lag and at the largest lag (mean ± sample std, dots: seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.2 * len(TASKS), 3.4))
    for ax, (name, env_id, folder, lags) in zip(axes, TASKS):
        width = 0.8 / len(lags)
        for j, lag in enumerate(lags):
            for i, method in enumerate(METHODS):
                v = aucs(env_id, folder, method, lag)
                x = i + (j - (len(lags) - 1) / 2) * width
                ax.bar(
                    x,
                    np.mean(v),
                    width * 0.9,
                    yerr=np.std(v, ddof=1),
                    capsize=3,
                    color=f"C{i}",
                    alpha=1.0 if lag == "0" else 0.45,
                    hatch=None if lag == "0" else "//",
                )
                ax.plot([x] * len(v), v, "k.", markersize=3)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=20, fontsize=8)
        lag_text = (
            f"lags {' and '.join(lags)}"
            if "async" not in lags
            else "measured lag, " + lag_label(env_id, folder, "async").split(", ")[1]
        )
        ax.set_title(f"{name}\n{lag_text}", fontsize=8)
    axes[0].set_ylabel("AUC (mean return during training)")
    fig.suptitle(
        "AUC without lag (solid) and at the largest lag (hatched; real async: its measured lag); "
        "mean ± sample std over 3 seeds, dots: seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--plot",
        type=Path,
        nargs="?",
        const=ROOT / "tests" / "results" / "at_a_glance_per_task.png",
        default=None,
        help="also draw the figure (default path: tests/results/at_a_glance_per_task.png)",
    )
    parser.add_argument("--delta", action="store_true", help='print the table of the README\'s "Choosing δ"')
    parser.add_argument("--gates", action="store_true", help="print what the gate did in the δ study")
    args = parser.parse_args()
    print(gate_table() if args.gates else delta_table() if args.delta else table(), end="")
    if args.plot is not None:
        plot(args.plot)


if __name__ == "__main__":
    main()
