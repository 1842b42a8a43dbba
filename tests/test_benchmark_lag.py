"""The opt-in lag benchmark's runner, on a tiny budget: run folders and flags, the summaries, the report, resuming."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, read_scalars

TINY = "--total-timesteps 2048 --num-steps 128"  # 4 iterations of 4 envs x 128 steps
sys.path.insert(0, str(ROOT / "tests"))
import benchmark_lag  # noqa: E402  (the runner as a module, for its summary and its table on hand-made data)


def benchmark(tmp_path, *args, env_ids=("CartPole-v1",)):
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "benchmark_lag.py"),
        "--out",
        str(tmp_path / "runs"),
        "--jobs",
        "2",
        "--summaries",
        str(tmp_path / "summaries"),
        *(["--env-ids", *env_ids] if env_ids else []),  # the LLM has none
        "--seeds",
        "1",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")
    )


@pytest.mark.slow  # real runs of the scripts, two at a time
def test_runs_each_method_and_variant_once_and_reports_them(tmp_path):
    """One run per method and variant with the flags they name, a summary of each that agrees with its event file, a
    report; then a rerun and --report-only, which read the summaries alone and run nothing."""
    args = [
        "--methods",
        "vaco",
        "ppo-noalign",
        "--lags",
        "0",
        "--variants",
        "default",
        "tv-delta=0.4,rho-bar=2",
        "--extra",
        TINY,
        "--results-dir",
        str(tmp_path / "results"),
        "--results-name",
        "{env}_sweep",
    ]
    first = benchmark(tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["vaco", "vaco+tv-delta=0.4,rho-bar=2", "ppo-noalign", "ppo-noalign+tv-delta=0.4,rho-bar=2"]
    summaries = tmp_path / "summaries" / "total-timesteps=2048,num-steps=128"  # named after --extra
    assert sorted(p.name for p in summaries.iterdir()) == sorted(f"CartPole-v1__{n}__lag0__s1.json" for n in names)
    for name in names:
        run_dir = tmp_path / "runs" / f"CartPole-v1__{name}__lag0__s1"
        summary = json.loads((summaries / f"CartPole-v1__{name}__lag0__s1.json").read_text())
        assert summary["cmd"].startswith("python vaco_classic.py --env-id CartPole-v1 --seed 1 --policy-lag 0 ")
        assert summary["lag"] == {"mean": 0.0, "max": 0.0, "q10_50_90": [0.0, 0.0, 0.0]}
        assert ("--tv-delta 0.4 --rho-bar 2" in summary["cmd"]) == ("+" in name)
        assert ("--policy-loss ppo --no-realign" in summary["cmd"]) == name.startswith("ppo")
        assert summary["peak_rss_mib"] > 100  # the script's process, torch and gymnasium loaded
        # the summary against the event file: final = mean return of the episodes in the last 10% of the steps
        returns = read_scalars(run_dir)["charts/episodic_return"]
        steps, values = np.array([s for s, _ in returns]), np.array([v for _, v in returns])
        assert summary["final"] == pytest.approx(values[steps >= 0.9 * 2048].mean())  # the same mean: rounding only
        assert values.min() <= summary["auc"] <= values.max()
    report = (tmp_path / "results" / "CartPole-v1_sweep.md").read_text()
    for name in names:
        assert f"| {name} | 0 |" in report
    assert "done" in first.stdout

    # resuming reads the summaries alone: without the run folders nothing runs again, and the report shows what the
    # summary files say (one is edited here to tell its number apart)
    shutil.rmtree(tmp_path / "runs")
    edited = summaries / "CartPole-v1__vaco__lag0__s1.json"
    edited.write_text(json.dumps(dict(json.loads(edited.read_text()), auc=123.4)))
    again = benchmark(tmp_path, *args)
    assert again.returncode == 0 and "done" not in again.stdout, again.stdout + again.stderr
    assert again.stdout.split("What the filter did")[0].count("| 1 |") == len(names)  # the AUC table's rows
    assert "| vaco | 0 | 123.4 | " in again.stdout
    assert not (tmp_path / "runs").exists()

    # --report-only runs nothing: the tables hold what the summaries have and name the runs still missing
    partial = benchmark(tmp_path, *args[:-4], "--seeds", "1", "2", "--report-only")
    assert partial.returncode == 0 and "done" not in partial.stdout, partial.stdout + partial.stderr
    assert "| vaco | 0 | 123.4 | " in partial.stdout and "--report-only" not in partial.stdout
    missing = ", ".join(
        f"CartPole-v1__{n}__lag0__s2"
        for n in ["vaco", "vaco+tv-delta=0.4,rho-bar=2", "ppo-noalign", "ppo-noalign+tv-delta=0.4,rho-bar=2"]
    )
    assert f"No summary yet for 4 of the grid's 8 runs: {missing}" in partial.stdout
    assert not (tmp_path / "runs").exists()


def test_a_run_cut_short_runs_again_from_a_clean_folder(tmp_path):
    """A run stopped before its summary (Ctrl-C, a killed session) leaves an event file in its folder; resuming runs
    it again in an emptied folder, so that its summary reads its own event file and not the stale one beside it."""
    args = ["--methods", "vaco", "--lags", "0", "--extra", "--total-timesteps 512 --num-steps 128"]
    first = benchmark(tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    summary_file = tmp_path / "summaries" / "total-timesteps=512,num-steps=128" / "CartPole-v1__vaco__lag0__s1.json"
    summary_file.unlink()  # as if the run had been stopped after its first event file, before its summary
    again = benchmark(tmp_path, *args)
    assert again.returncode == 0 and "done CartPole-v1__vaco__lag0__s1" in again.stdout, again.stdout + again.stderr
    assert len(list((tmp_path / "runs").rglob("events.out.tfevents.*"))) == 1
    assert summary_file.exists()


@pytest.mark.slow
def test_real_lag_summary_holds_the_lag_of_every_trained_rollout(tmp_path):
    """vaco_async_mp.py, named as the studies' commands name it (relative to the repository's root, while each run
    starts in its own folder): the summary keeps the lag distribution the script prints, and the per-seed table
    shows it."""
    result = benchmark(
        tmp_path,
        "--script",
        "vaco_async_mp.py",
        "--lags",
        "async",
        "--methods",
        "vaco",
        "--per-seed",
        "--extra",
        "--num-actors 2 --num-steps 64 --total-timesteps 2048",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary_file = (
        tmp_path / "summaries" / "num-actors=2,num-steps=64,total-timesteps=2048" / "CartPole-v1__vaco__lagasync__s1.json"
    )
    lag = json.loads(summary_file.read_text())["lag"]
    printed = (tmp_path / "runs" / "CartPole-v1__vaco__lagasync__s1" / "stdout.txt").read_text().splitlines()[-1]
    assert printed == "policy lag of the trained rollouts (versions: count): " + str(
        {int(k): v for k, v in lag["rollouts"].items()}
    )
    assert sum(lag["rollouts"].values()) == 2048 // (2 * 64)  # every rollout (2 envs per actor x 64 steps), once
    assert max(int(k) for k in lag["rollouts"]) == lag["max"]
    assert "rollouts by lag " + ", ".join(f"{k}: {v}" for k, v in lag["rollouts"].items()) in result.stdout


def test_the_lag_must_fit_the_script(tmp_path):
    """--lags async only with vaco_async_mp.py and integer lags only with the others, refused before any run."""
    wrong = benchmark(tmp_path, "--methods", "vaco", "--lags", "async")
    assert wrong.returncode != 0 and "integers" in wrong.stderr
    wrong = benchmark(tmp_path, "--methods", "vaco", "--lags", "0", "--script", str(ROOT / "vaco_async_mp.py"))
    assert wrong.returncode != 0 and "only 'async'" in wrong.stderr
    assert not (tmp_path / "runs").exists()


def test_malformed_variant_fails_before_any_run(tmp_path):
    result = benchmark(tmp_path, "--methods", "vaco", "--lags", "0", "--variants", "tv-delta")
    assert result.returncode != 0 and "NAME=VALUE" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_auc_is_the_trapezoid_over_unevenly_spaced_episodes_divided_by_their_span(tmp_path):
    """The headline metric on a series worked out by hand. Episodes end at steps 0, 10, 40 and 100 with returns 100,
    0, 0 and 40: trapezoids 10·50 + 30·0 + 60·20 = 1700 over the span of 100 steps, AUC 17.0. Each wrong average
    gives another number: the unweighted mean of the points 35.0, of the segment midpoints 23.3, without the first
    point 13.3, without the last 12.5, left or right sums 10.0 or 24.0, over --total-timesteps (200) instead of the
    span 8.5. Final: the mean of the episodes in the last 10% of the steps, here the one at step 100."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step, episodic_return in [(0, 100.0), (10, 0.0), (40, 0.0), (100, 40.0)]:
        writer.add_scalar("charts/episodic_return", episodic_return, step)
    writer.close()
    summary = benchmark_lag.summarize(tmp_path / "run", total_steps=100)
    assert summary["auc"] == pytest.approx(17.0, abs=1e-9)  # float64 sums of a few exact numbers: rounding ~1e-15
    assert summary["final"] == 40.0 and summary["episodes"] == 4 and summary["lag"] is None  # exact: one episode
    assert benchmark_lag.summarize(tmp_path / "run", total_steps=200)["auc"] == pytest.approx(17.0, abs=1e-9)


def test_tables_show_mean_and_sample_std_and_say_so():
    """± is the sample standard deviation (ddof = 1): AUC 10, 20, 60 has mean 30 and std 26.5 (ddof = 0 would be
    21.6); the table says what ± is; a single seed shows its value without a spread."""
    results = {
        benchmark_lag.run_tag("CartPole-v1", "vaco", "default", 0, s): dict(
            auc=a, final=a + 1, sps=100.0, wall_s=10.0, lag=None
        )
        for s, a in [(1, 10.0), (2, 20.0), (3, 60.0)]
    }
    report = benchmark_lag.markdown_report(results, "CartPole-v1", ["vaco"], [0], [1, 2, 3], False, "cmd")
    assert "| vaco | 0 | 30.0 ± 26.5 | 31.0 ± 26.5 | – | 100 | 3 |" in report
    assert "mean ± sample standard deviation (ddof = 1)" in report
    one = benchmark_lag.markdown_report(results, "CartPole-v1", ["vaco"], [0], [3], False, "cmd")
    assert "| vaco | 0 | 60.0 | 61.0 | – | 100 | 1 |" in one


def test_summaries_record_what_the_filter_did_and_the_table_shows_it(tmp_path):
    """The gate statistics are the run's per-iteration values averaged over the iterations, and the filter table
    averages them over the seeds; a run without charts/tv_delta (older script) shows – for the bound."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    logged = {
        "losses/filter_gate_frac": [0.0, 0.5, 1.0],
        "losses/filtered_frac": [0.0, 0.1, 0.2],
        "align/tv_behavior": [0.0, 0.05, 0.1],
        "losses/tv": [0.1, 0.1, 0.4],
        "charts/tv_delta": [0.2, 0.3, 0.4],
    }
    for key, series in logged.items():
        for step, value in enumerate(series):
            writer.add_scalar(key, value, 2048 * (step + 1))
    writer.add_scalar("charts/episodic_return", 1.0, 10)
    writer.close()
    gate = benchmark_lag.summarize(tmp_path / "run", total_steps=6144)["gate"]
    # means of values the log stores as float32 (0.1 is 1.5e-8 off): approx's 1e-6 relative
    assert gate == pytest.approx({"closed": 0.5, "dropped": 0.1, "tv_behavior": 0.05, "tv": 0.2, "tv_delta": 0.3})
    old = dict(gate, closed=1.0)
    del old["tv_delta"]
    results = {
        benchmark_lag.run_tag("Hopper-v5", "vaco", "default", 8, s): dict(
            auc=1.0, final=1.0, sps=1.0, wall_s=1.0, lag=None, gate=g
        )
        for s, g in [(1, gate), (2, old)]
    }
    report = benchmark_lag.markdown_report(results, "Hopper-v5", ["vaco"], [8], [1, 2], False, "cmd")
    assert "| vaco | 8 | 0.750 | 0.100 | 0.050 | 0.200 | – | 2 |" in report
    only_new = benchmark_lag.markdown_report(results, "Hopper-v5", ["vaco"], [8], [1], False, "cmd")
    assert "| vaco | 8 | 0.500 | 0.100 | 0.050 | 0.200 | 0.300 | 1 |" in only_new


def test_only_variants_that_set_delta_alone_are_points_of_a_delta_sweep():
    """delta_of parses the variant's number, so the comparisons are exact."""
    assert benchmark_lag.delta_of("default", 0.2) == 0.2
    assert benchmark_lag.delta_of("tv-delta=0.05", 0.2) == 0.05
    assert benchmark_lag.delta_of("tv-delta=0.4,rho-bar=2", 0.2) is None
    assert benchmark_lag.delta_of("tv-delta-rule=forward", 0.2) is None


# ---------------------------------------------------------------- the LLM's runs and their peak memory


def write_events(folder, logged):
    """A TensorBoard event file under `folder` holding {key: [(step, value), ...]}."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for key, points in logged.items():
        for step, value in points:
            writer.add_scalar(key, value, step)
    writer.close()


# eval/accuracy at steps 0, 2 and 10: trapezoids 2·0.35 + 8·0.5 = 4.7 over the span of 10 steps, AUC 0.47 (the
# unweighted mean of the points would be 0.367, the best point 0.6, the final one 0.4); the reward's mean 0.3 is
# neither its last value nor its median; policy lag 0 at warm-up, then 1
LLM_EVENTS = {
    "eval/accuracy": [(0, 0.1), (2, 0.6), (10, 0.4)],
    "charts/reward_mean": [(1, 0.0), (2, 0.25), (3, 0.75), (4, 0.2)],
    "charts/policy_lag": [(1, 0), (2, 1), (3, 1), (4, 1)],
    "losses/filter_gate_frac": [(1, 0.0), (2, 0.5), (3, 1.0), (4, 0.5)],
    "losses/filtered_frac": [(1, 0.0), (2, 0.02), (3, 0.1), (4, 0.04)],
    "losses/tv": [(1, 0.01), (2, 0.02), (3, 0.03), (4, 0.04)],
    "align/tv_behavior": [(1, 4e-6), (2, 0.02), (3, 0.02), (4, 0.04)],
    "align/numerical_floor": [(1, 8e-6)],
}


def test_llm_summary_is_the_greedy_accuracy_curve_its_average_and_what_the_gate_did(tmp_path):
    """The curve as logged, its AUC worked out by hand (LLM_EVENTS), the first and last accuracy; the means over the
    4 steps of the reward (0.3), gate closed (0.5), tokens dropped (0.04), TV (0.025) and lag TV; the floor at step 1."""
    write_events(tmp_path / "run", LLM_EVENTS)
    summary = benchmark_lag.summarize_llm(tmp_path / "run")
    assert summary["accuracy"] == [[0, pytest.approx(0.1)], [2, pytest.approx(0.6)], [10, pytest.approx(0.4)]]
    # the event file stores float32: its rounding (~1e-8 on values of ~0.5) is the scale of every tolerance here
    assert summary["accuracy_auc"] == pytest.approx(0.47, abs=1e-6)
    assert summary["accuracy_first"] == pytest.approx(0.1, abs=1e-6)
    assert summary["accuracy_final"] == pytest.approx(0.4, abs=1e-6)
    assert summary["reward_mean"] == pytest.approx(0.3, abs=1e-6) and summary["train_steps"] == 4
    assert summary["gate"] == pytest.approx(
        {"closed": 0.5, "dropped": 0.04, "tv": 0.025, "tv_behavior": (4e-6 + 0.08) / 4}, abs=1e-6
    )  # no charts/tv_delta: the LLM's bound is the fixed --tv-delta
    assert summary["lag"] == {"mean": 0.75, "max": 1.0, "q10_50_90": pytest.approx([0.3, 1.0, 1.0])}
    assert summary["numerical_floor"] == pytest.approx(8e-6, rel=1e-6)


# A stand-in for a training script: it holds `MiB` of memory written byte by byte (so resident), then leaves the
# event files of TEMPLATE as its run, as the scripts leave theirs under runs/
STAND_IN = """import shutil
block = b"1" * (MiB << 20)
shutil.copytree(TEMPLATE, "runs/stand-in")
print(len(block), "bytes held")
"""


@pytest.mark.parametrize("script", ["vaco_classic.py", "vaco_llm_math.py"])
def test_peak_memory_is_each_runs_own(tmp_path, script):
    """Two runs one after the other, the first holding 300 MiB, started while the caller holds 300 MiB too: each
    summary records its own process's peak resident memory, so the second inherits neither the first's (as the peak
    over all children, getrusage RUSAGE_CHILDREN, would give) nor the caller's (as a process exec'd straight from
    the caller would: Linux starts its ru_maxrss at the caller's peak). A Python process without the block is
    ~10 MiB; the margins are tens of MiB."""
    held_by_the_caller = b"1" * (300 << 20)
    write_events(
        tmp_path / "template", {**LLM_EVENTS, "charts/episodic_return": [(10, 1.0), (20, 3.0)], "charts/SPS": [(20, 100.0)]}
    )
    summaries = tmp_path / "summaries"
    peaks = {}
    for seed, mib in [(1, 300), (2, 0)]:
        stand_in = tmp_path / f"seed{seed}" / script
        stand_in.parent.mkdir()
        stand_in.write_text(STAND_IN.replace("MiB", str(mib)).replace("TEMPLATE", repr(str(tmp_path / "template"))))
        job = ("synthetic" if "llm" in script else "CartPole-v1", "ppo", "default", 1, seed, ["--total-timesteps", "20"])
        tag, summary = benchmark_lag.run_one(job, tmp_path / "runs", summaries, stand_in, lambda env_id, extra: 20)
        assert summary is not None, (tmp_path / "runs" / tag / "stdout.txt").read_text()
        assert json.loads((summaries / f"{tag}.json").read_text()) == summary
        peaks[seed] = summary["peak_rss_mib"]
        env_flags = [] if "llm" in script else ["--env-id", "CartPole-v1"]
        assert summary["cmd"].split()[2:] == [
            *env_flags,
            *["--seed", str(seed), "--policy-lag", "1", "--exp-name", tag, "--no-cuda", "--total-timesteps", "20"],
            *["--policy-loss", "ppo"],
        ]
        if "llm" in script:
            assert summary["accuracy_auc"] == pytest.approx(0.47, abs=1e-6) and "auc" not in summary
        else:
            assert summary["auc"] == pytest.approx(2.0, abs=1e-6) and summary["final"] == pytest.approx(3.0)
    assert peaks[1] > 300 and peaks[2] < 100 and len(held_by_the_caller) == 300 << 20, peaks


def llm_summary(accuracy, reward, gate, seed):
    """A hand-made summary of an LLM run: the AUC of the curve [[0, a0], [10, a1]] is their mean."""
    return {
        "accuracy": [[0, accuracy[0]], [10, accuracy[1]]],
        "accuracy_auc": float(np.mean(accuracy)),
        "accuracy_first": accuracy[0],
        "accuracy_final": accuracy[1],
        "reward_mean": reward,
        "lag": {"mean": 0.9, "max": 1.0, "q10_50_90": [1.0, 1.0, 1.0]},
        "gate": dict(zip(["closed", "dropped", "tv_behavior", "tv"], gate)),
        "numerical_floor": 7.6e-6 if seed == 1 else None,
        "peak_rss_mib": 12288.0,
        "wall_s": 1800.0,
    }


def test_llm_report_is_mean_and_sample_std_over_the_seeds_then_each_seed():
    """vaco at lag 1, seeds 1 and 2: AUC 0.1 and 0.3 -> 0.200 ± 0.141 (sample std |0.3 - 0.1| / sqrt 2; ddof = 0 would
    give 0.100), final 0.2 and 0.4 -> 0.300 ± 0.141, reward 0.05 and 0.15 -> 0.100 ± 0.071, gate closed 0 and 1 ->
    0.500 ± 0.707, dropped 0.02 and 0.06 -> 0.040 ± 0.028, lag TV 0.01 and 0.03 -> 0.020 ± 0.014; ppo at lag 4 has one
    seed: its values alone."""
    tag = benchmark_lag.run_tag
    results = {
        tag("synthetic", "vaco", "default", 1, 1): llm_summary([0.0, 0.2], 0.05, [0.0, 0.02, 0.01, 0.1], 1),
        tag("synthetic", "vaco", "default", 1, 2): llm_summary([0.2, 0.4], 0.15, [1.0, 0.06, 0.03, 0.1], 2),
        tag("synthetic", "ppo", "default", 4, 1): llm_summary([0.1, 0.5], 0.25, [0.25, 0.0, 0.05, 0.1], 1),
    }
    report = benchmark_lag.llm_markdown_report(results, "synthetic", ["vaco", "ppo"], [1, 4], [1, 2], "cmd")
    assert (
        "| vaco | 1 | 0.200 ± 0.141 | 0.300 ± 0.141 | 0.100 ± 0.071 | 0.500 ± 0.707 | 0.040 ± 0.028 | 0.020 ± 0.014 | 2 |"
        in (report)
    )
    assert "| ppo | 4 | 0.300 | 0.500 | 0.250 | 0.250 | 0.000 | 0.050 | 1 |" in report
    assert "| vaco | 4 |" not in report and "| ppo | 1 |" not in report  # no runs, no rows
    assert "| vaco | 1 | 1 | 0: 0.000, 10: 0.200 | 0.90 (max 1) | 7.6e-06 | 12.0 | 30.0 |" in report
    assert "| vaco | 1 | 2 | 0: 0.200, 10: 0.400 | 0.90 (max 1) | – | 12.0 | 30.0 |" in report
    assert "mean ± sample standard deviation (ddof = 1)" in report and "(1.5 h of run time" in report


def test_llm_report_plots_greedy_accuracy_against_the_step(tmp_path):
    pytest.importorskip("matplotlib")
    results = {
        benchmark_lag.run_tag("synthetic", "vaco", "default", 1, s): llm_summary([0.1 * s, 0.2 * s], 0.1, [0] * 4, s)
        for s in (1, 2)
    }
    benchmark_lag.plot_llm_accuracy(results, "synthetic", ["vaco", "ppo"], [1], [1, 2], tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_llm_runs_without_evaluation_give_a_table_of_what_they_have_and_no_plot(tmp_path):
    """--eval-samples 0 (the δ sweep's setting) leaves no accuracy curve: its cells read "–", the rest is the table's,
    and the plot is skipped with a line instead of failing."""
    unevaluated = llm_summary([0.0, 0.0], 0.05, [0.5, 0.01, 0.02, 0.1], 1)
    unevaluated.update(accuracy=[], accuracy_auc=float("nan"), accuracy_first=float("nan"), accuracy_final=float("nan"))
    results = {benchmark_lag.run_tag("synthetic", "vaco", "default", 1, 1): unevaluated}
    report = benchmark_lag.llm_markdown_report(results, "synthetic", ["vaco"], [1], [1], "cmd")
    assert "| vaco | 1 | – | – | 0.050 | 0.500 | 0.010 | 0.020 | 1 |" in report
    assert "| vaco | 1 | 1 | – (no evaluation) | 0.90 (max 1) | 7.6e-06 | 12.0 | 30.0 |" in report
    benchmark_lag.plot_llm_accuracy(results, "synthetic", ["vaco"], [1], [1], tmp_path / "accuracy.png")
    assert not (tmp_path / "accuracy.png").exists()


def test_the_llm_takes_only_the_methods_and_flags_it_has(tmp_path):
    """vaco_llm_math.py has no critic (no --no-realign) and no impala loss: such a method or variant is refused with
    one line before anything runs, as is --env-ids; a method another script lacks is refused the same way."""
    llm = ["--script", "vaco_llm_math.py", "--lags", "1"]
    takes = "; it takes vaco ppo"
    for args, message in [
        (["--methods", "vaco", "ppo-noalign"], "--methods: vaco_llm_math.py does not take ppo-noalign (--no-realign)" + takes),
        (["--methods", "impala"], "--methods: vaco_llm_math.py does not take impala (--policy-loss impala)" + takes),
        (
            ["--methods", "vaco", "--variants", "rho-bar=2"],
            "--variants: vaco_llm_math.py does not take --rho-bar (variant rho-bar=2)",
        ),
    ]:
        refused = benchmark(tmp_path, *llm, *args, env_ids=())
        assert refused.returncode != 0 and refused.stderr.strip() == message, refused.stderr
    with_env = benchmark(tmp_path, *llm, "--methods", "vaco")  # the helper's --env-ids CartPole-v1
    assert with_env.returncode != 0 and "--env-ids: vaco_llm_math.py has no environment" in with_env.stderr
    learner = benchmark(tmp_path, "--script", "vaco_async_mp.py", "--lags", "async", "--methods", "vaco-learner")
    assert learner.returncode != 0 and "does not take vaco-learner (--tv-anchor)" in learner.stderr
    assert not (tmp_path / "runs").exists()


def test_each_script_takes_the_methods_whose_flags_it_has():
    """Read from each script's Args: vaco_classic.py takes every method (--no-realign is its boolean --realign's
    negation, --policy-loss impala one of its choices); vaco_llm_math.py, without a critic or IMPALA, vaco and ppo."""

    def takes(script):
        flags, losses = benchmark_lag.script_flags(ROOT / script)
        return [
            m
            for m, method_flags in benchmark_lag.METHODS.items()
            if not benchmark_lag.unknown_flag(method_flags, flags, losses)
        ]

    assert takes("vaco_classic.py") == list(benchmark_lag.METHODS)
    assert takes("vaco_llm_math.py") == ["vaco", "ppo"]


def test_a_path_names_the_summaries_folder_by_its_last_part_and_runs_get_it_absolute(tmp_path, monkeypatch):
    """The model folder names the LLM's summaries by its name (the same study resumes wherever the folder lies);
    the run, started in its own folder, gets the path made absolute; a hub id that is no local folder stays."""
    assert benchmark_lag.extra_name(
        ["--model-name-or-path", "/data/SmolLM2-135M-Instruct/", "--dataset", "openai/gsm8k", "--no-cuda", "--seed", "2"]
    ) == ("model-name-or-path=SmolLM2-135M-Instruct,dataset=gsm8k,no-cuda,seed=2")
    assert (
        benchmark_lag.extra_name(["--total-timesteps", "500000", "--ent-coef", "0.0"]) == "total-timesteps=500000,ent-coef=0.0"
    )
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert benchmark_lag.with_absolute_paths(
        ["--model-name-or-path", "models/tiny", "--dataset-path", "Qwen/none", "--exp-name", "models/tiny"]
    ) == [
        "--model-name-or-path",
        str(tmp_path / "models" / "tiny"),
        "--dataset-path",
        "Qwen/none",
        "--exp-name",
        "models/tiny",
    ]
    assert benchmark_lag.llm_data_name(["--dataset", "openai/gsm8k", "--dataset", "synthetic"]) == "synthetic"
    assert benchmark_lag.llm_data_name(["--dataset-path", "/data/problems.jsonl"]) == "problems.jsonl"
    assert benchmark_lag.llm_data_name([]) == "gsm8k"


@pytest.mark.slow  # four real runs of vaco_llm_math.py on a tiny random model, two at a time
def test_llm_lag_study_runs_summarizes_and_reports_on_a_tiny_model(tmp_path):
    """The lag study's command on the tiny test model of test_llm_math.py: each summary is the run's event file
    read back (curve, lag, gate, floor) with the process's peak memory; --report-only makes the table and the plot."""
    from test_llm_math import build_tiny_model, tiny_run_flags

    model = build_tiny_model(tmp_path / "tiny-qwen2")
    extra = " ".join(map(str, tiny_run_flags(model, "--total-steps", "3", "--eval-every", "1")))
    args = ["--script", "vaco_llm_math.py", "--methods", "vaco", "ppo", "--lags", "1", "2", "--extra", extra]
    report_args = ["--results-dir", str(tmp_path / "results"), "--results-name", "llm_lag_study"]
    result = benchmark(tmp_path, *args, env_ids=())
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = tmp_path / "summaries" / benchmark_lag.extra_name(extra.split())
    assert summaries.name.startswith("model-name-or-path=tiny-qwen2,dataset=synthetic,")
    for method in ("vaco", "ppo"):
        for lag in (1, 2):
            tag = f"synthetic__{method}__lag{lag}__s1"
            summary = json.loads((summaries / f"{tag}.json").read_text())
            scalars = read_scalars(tmp_path / "runs" / tag)
            assert summary["accuracy"] == [[step, pytest.approx(value)] for step, value in scalars["eval/accuracy"]]
            assert [step for step, _ in summary["accuracy"]] == [0, 1, 2, 3]
            # batches of steps 1..3 were sampled with version max(0, T - 1 - K): lags 0, 1, 2 capped at K
            assert summary["lag"]["mean"] == pytest.approx(np.mean([min(t, lag) for t in range(3)]))
            assert set(summary["gate"]) == {"closed", "dropped", "tv_behavior", "tv"}
            assert 0 < summary["numerical_floor"] < 1e-3  # fp32: rounding only (README: ~1.6e-7 on the test model)
            assert summary["peak_rss_mib"] > 200  # torch and transformers loaded in the run's own process
            assert summary["cmd"].startswith(f"python vaco_llm_math.py --seed 1 --policy-lag {lag} --exp-name {tag} ")
            assert summary["cmd"].endswith(" --policy-loss ppo") == (method == "ppo")
            assert f"--model-name-or-path {model} " in summary["cmd"]
    shutil.rmtree(tmp_path / "runs")
    report = benchmark(tmp_path, *args, *report_args, "--seeds", "1", "2", "--report-only", env_ids=())
    assert report.returncode == 0 and "done" not in report.stdout, report.stdout + report.stderr
    table = (tmp_path / "results" / "llm_lag_study.md").read_text()
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.endswith(" | 1 |")] == [
        ["| vaco", "1"],
        ["| vaco", "2"],
        ["| ppo", "1"],
        ["| ppo", "2"],
    ]
    assert "No summary yet for 4 of the grid's 8 runs" in table and "--report-only" not in table
    assert (tmp_path / "results" / "llm_lag_study_accuracy.png").stat().st_size > 10_000
