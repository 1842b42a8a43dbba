"""tests/aggregate.py's math on hand-made scores: the normalization, which runs count, the aggregates, the probability
of improvement and the bootstrap, each against a computation done by hand or by rliable's own metrics."""

import json
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import aggregate  # noqa: E402
from rliable import metrics  # noqa: E402

# Scores near 1 computed two ways (sums in another order): equal up to a few ulps of 1
EXACT = 1e-12


def test_the_aggregates_of_a_hand_made_set():
    scores = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 100.0]])  # 4 runs x 2 tasks
    # IQM: the 8 runs sorted are 0 1 2 3 4 5 6 100; drop the lowest 2 and the highest 2 -> mean(2, 3, 4, 5)
    # median and mean of the task means (3 and 27.25); optimality gap: 1 - mean(min(score, 1)) = 1 - 7/8
    expected = [3.5, (3 + 27.25) / 2, (3 + 27.25) / 2, 1 / 8]
    assert aggregate.aggregates(scores) == pytest.approx(expected, abs=EXACT)


def test_the_aggregates_are_rliables_metrics():
    """On random arrays of every shape the tables meet (ties and cuts of 25% that are not whole runs included)."""
    rng = np.random.default_rng(0)
    for runs in range(1, 7):
        for tasks in range(1, 4):
            scores = rng.integers(-3, 4, size=(runs, tasks)) / 2  # few distinct values: ties
            expected = [
                metrics.aggregate_iqm(scores),
                metrics.aggregate_median(scores),
                metrics.aggregate_mean(scores),
                metrics.aggregate_optimality_gap(scores),
            ]
            assert aggregate.aggregates(scores) == pytest.approx(expected, abs=EXACT), (runs, tasks)


def test_probability_of_improvement_of_hand_made_sets():
    # one task, x = 1 2 3 against y = 2 2 0: of the 9 pairs x wins 5 (1>0, 2>0, 3>2, 3>2, 3>0), ties 2 (2=2), loses 2
    x, y = np.array([[1.0], [2.0], [3.0]]), np.array([[2.0], [2.0], [0.0]])
    assert aggregate.probability_of_improvement(x, y) == pytest.approx(5 / 9 + 0.5 * 2 / 9, abs=EXACT)
    assert aggregate.probability_of_improvement(y, x) == pytest.approx(2 / 9 + 0.5 * 2 / 9, abs=EXACT)
    # two tasks, 2 runs against 1: x wins every pair on the first, loses every pair on the second: the mean, 0.5
    x, y = np.array([[5.0, 0.0], [6.0, 1.0]]), np.array([[4.0, 2.0]])
    assert aggregate.probability_of_improvement(x, y) == pytest.approx(0.5, abs=EXACT)


def test_probability_of_improvement_is_rliables():
    rng = np.random.default_rng(1)
    for runs_x, runs_y, tasks in [(3, 3, 1), (3, 2, 2), (5, 4, 3), (2, 5, 3)]:
        x = rng.integers(0, 4, size=(runs_x, tasks)).astype(float)  # few distinct values: ties
        y = rng.integers(0, 4, size=(runs_y, tasks)).astype(float)
        expected = metrics.probability_of_improvement(x, y)
        assert aggregate.probability_of_improvement(x, y) == pytest.approx(expected, abs=EXACT)


def test_normalize_maps_random_to_0_and_the_reference_to_1():
    assert aggregate.normalize([-100.0, 300.0, 500.0], -100.0, 300.0) == pytest.approx([0.0, 1.0, 1.5], abs=EXACT)


def write(summaries, folder, env_id, method, lag, seed, final, auc):
    path = summaries / folder / f"{env_id}__{method}__lag{lag}__s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"final": final, "auc": auc}))


def test_which_runs_count_and_how_they_are_normalized(tmp_path):
    """Normalized by the task's random return and `ppo-noalign`'s lag-0 mean over all its seeds; a task with fewer
    than 2 seeds is left out; every task gives as many runs as the one with the fewest, its lowest-numbered seeds."""
    random = aggregate.RANDOM_RETURN
    hopper, cheetah, walker = aggregate.TASKS
    for seed, final in [(1, 100.0), (2, 300.0), (3, 500.0)]:  # Hopper's reference: mean 300
        write(tmp_path, aggregate.MUJOCO, hopper, "ppo-noalign", "0", seed, final, final / 2)
    for seed, final in [(1, 1000.0), (2, 2000.0)]:  # HalfCheetah's: mean 1500
        write(tmp_path, aggregate.MUJOCO, cheetah, "ppo-noalign", "0", seed, final, final / 2)
    write(tmp_path, aggregate.MUJOCO, walker, "ppo-noalign", "0", 1, 50.0, 50.0)  # one seed: no reference
    for seed in [1, 2, 3]:  # vaco at lag 8: Hopper seeds 1 2 3, HalfCheetah seeds 2 and 5, Walker2d seeds 1 2 3
        write(tmp_path, aggregate.MUJOCO, hopper, "vaco", "8", seed, 100.0 * seed, 0.0)
        write(tmp_path, aggregate.MUJOCO, walker, "vaco", "8", seed, 1.0, 0.0)
    write(tmp_path, aggregate.MUJOCO, cheetah, "vaco", "8", 2, 0.0, 0.0)
    write(tmp_path, aggregate.MUJOCO, cheetah, "vaco", "8", 5, 1500.0, 0.0)

    scores, tasks, counts, used = aggregate.runs(tmp_path, aggregate.SETTINGS[1], "vaco", "final")
    assert tasks == [hopper, cheetah] and counts == {hopper: 3, cheetah: 2, walker: 3} and used == 2
    expected_hopper = [(100 - random[hopper]) / (300 - random[hopper]), (200 - random[hopper]) / (300 - random[hopper])]
    expected_cheetah = [(0 - random[cheetah]) / (1500 - random[cheetah]), 1.0]
    assert scores == pytest.approx(np.array([expected_hopper, expected_cheetah]).T, abs=EXACT)
    # the AUC has its own reference (the mean of the AUCs): Hopper's is 150
    auc_scores = aggregate.runs(tmp_path, aggregate.SETTINGS[1], "vaco", "auc")[0]
    assert auc_scores[:, 0] == pytest.approx([-random[hopper] / (150 - random[hopper])] * 2, abs=EXACT)
    # real async is normalized by the simulated lag-0 reference of the same task
    for seed in [1, 2]:
        write(tmp_path, aggregate.ASYNC, hopper, "vaco", "async", seed, 300.0, 0.0)
    assert aggregate.runs(tmp_path, aggregate.SETTINGS[2], "vaco", "final")[0] == pytest.approx(np.ones((2, 1)), abs=EXACT)
    assert aggregate.seeds_text(counts, used, tasks) == "3/2/(3) → 2"  # Walker2d has runs but no reference


def test_a_settings_aggregates_use_the_tasks_that_every_method_with_runs_there_has(tmp_path):
    """While a grid fills up, one method may have a task that another still lacks: every row of a column then leaves
    it out, so that the rows compare the same tasks; the seeds text shows it in parentheses."""
    hopper, cheetah, _ = aggregate.TASKS
    for env_id in (hopper, cheetah):
        for seed in (1, 2):
            write(tmp_path, aggregate.MUJOCO, env_id, "ppo-noalign", "0", seed, 1000.0 * seed, 0.0)  # the references
            write(tmp_path, aggregate.MUJOCO, env_id, "vaco", "8", seed, 400.0 * seed, 0.0)
    write(tmp_path, aggregate.MUJOCO, hopper, "ppo-kl", "8", 1, 100.0, 0.0)
    write(tmp_path, aggregate.MUJOCO, hopper, "ppo-kl", "8", 2, 300.0, 0.0)
    write(tmp_path, aggregate.MUJOCO, cheetah, "ppo-kl", "8", 1, 100.0, 0.0)  # one seed: ppo-kl has no HalfCheetah
    table = aggregate.report(tmp_path)[0]
    setting = aggregate.SETTINGS[1]
    assert setting[0] == "lag 8"
    hopper_only = aggregate.runs(tmp_path, setting, "vaco", "final", [hopper])[0]
    point, text = table["lag 8", "vaco", "final"]
    assert text == "2/(2)/0 → 2" and table["lag 8", "ppo-kl", "final"][1] == "2/(1)/0 → 2"
    expected = aggregate.interval(hopper_only, aggregate.aggregates)
    assert np.array_equal(point[0], expected[0]) and np.array_equal(point[1], expected[1])
    assert table["lag 8", "impala", "final"] == (None, "0/0/0 → –")  # a method without runs narrows nothing


def test_the_bootstrap_resamples_runs_within_each_task():
    """Runs that agree within each task give one value per resample: a stratified bootstrap's interval of the mean is
    a point, where resampling the 6 runs across the tasks would spread it from 0 to 10 (a 95% interval of about
    [1.7, 8.3])."""
    scores = np.array([[0.0, 10.0]] * 3)
    point, (lows, highs) = aggregate.interval(scores, aggregate.aggregates)
    assert point[2] == lows[2] == highs[2] == 5.0


def test_the_bootstrap_is_the_same_on_every_call_and_leaves_numpys_generator_alone():
    scores = np.random.default_rng(2).normal(size=(3, 2))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = aggregate.interval(scores, aggregate.aggregates)
    assert np.array_equal(np.random.get_state()[1], before)
    np.random.rand()  # another state of the global generator: the same interval
    second = aggregate.interval(scores, aggregate.aggregates)
    assert np.array_equal(first[1], second[1])
    lows, highs = first[1]
    assert np.all(lows <= first[0]) and np.all(first[0] <= highs) and np.all(lows < highs)


def test_the_seeds_line_names_the_methods_whose_counts_differ():
    """The counts most methods have come bare, the others with their methods; equal settings share a line."""
    common, other = (None, "3/3/0 → 3"), (None, "2/0/0 → 2")  # (bootstrap result, seeds text)
    seeds = {"lag 0": common, "lag 8": common, "real async": (None, "3 → 3")}
    table = {(name, method, "final"): seeds[name] for name, *_ in aggregate.SETTINGS for method in aggregate.METHODS}
    assert aggregate.seeds_line(table).endswith("; lag 0 and lag 8: 3/3/0 → 3 · real async: 3 → 3.")
    table["lag 0", "impala", "final"] = table["lag 0", "spo-noalign", "final"] = other
    expected = "; lag 0: 3/3/0 → 3, spo-noalign and impala 2/0/0 → 2 · lag 8: 3/3/0 → 3 · real async: 3 → 3."
    assert aggregate.seeds_line(table).endswith(expected)


@pytest.mark.parametrize(
    "env_id",
    ["Hopper-v5", "Walker2d-v5", pytest.param("HalfCheetah-v5", marks=pytest.mark.slow)],  # 100 x 1000 steps: 15 s
)
def test_the_random_returns_are_what_the_stated_procedure_measures(env_id):
    """RANDOM_RETURN holds two decimals of the mean: measured again, it rounds to the same."""
    mean, _ = aggregate.random_return(env_id)
    assert round(mean, 2) == aggregate.RANDOM_RETURN[env_id]
