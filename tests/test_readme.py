"""The README and the studies page: every relative link resolves, the results tables are what the committed summaries
give, and the README stays short enough to read in one go."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from urllib.parse import unquote

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import aggregate  # noqa: E402
import llm_precision  # noqa: E402
import results_at_a_glance  # noqa: E402

PAGES = [ROOT / "README.md", ROOT / "tests" / "results" / "README.md"]
GLANCE = re.compile(r"<!-- results-at-a-glance: start -->\n(.*?)<!-- results-at-a-glance: end -->", re.S)


def github_anchors(markdown):
    """The #anchors GitHub gives the headings of a page: lowercase, punctuation dropped except - and _ (letters, marks
    such as the bar of ρ̄, and digits stay), each space a -, a repeated anchor suffixed -1, -2, ... Code blocks hold
    no headings."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        kept = (
            c
            for c in heading.strip().lower()
            if c in "-_ " or unicodedata.category(c)[0] in "LM" or unicodedata.category(c) == "Nd"
        )
        slug = "".join(kept).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def links(markdown):
    """The targets of the page's markdown links and images, outside code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^()\s]+)\)", text)


def test_github_anchor_rules():
    """github_anchors, which the link check relies on, gives GitHub's anchors for a page worked out by hand."""
    page = "# A: b\n## `x.py`: the δ, ρ̄ (and more)\n## Twice\n## Twice\n```\n# not a heading\n```\n"
    assert github_anchors(page) == {"a-b", "xpy-the-δ-ρ̄-and-more", "twice", "twice-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    text = page.read_text()
    checked, broken = 0, []
    for target in links(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ... are not checked (no network)
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and (file.suffix != ".md" or unquote(anchor) not in github_anchors(file.read_text())):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {file.name}")
        checked += 1
    assert not broken, "\n".join(broken)
    assert checked >= 10  # the pages link to each other and to the tables: a parser that finds nothing is broken


def test_readme_results_table_is_what_the_committed_summaries_give():
    block = GLANCE.search((ROOT / "README.md").read_text())
    assert block, "README.md: the results-at-a-glance markers are missing"
    assert block.group(1) == aggregate.table(), (
        "README.md's results table differs from the committed summaries: paste the output of "
        "`python tests/aggregate.py` between the markers"
    )


def test_the_studies_pages_glance_tables_are_what_the_committed_summaries_give():
    """Every aggregate with its interval, and the per-task table the README showed before."""
    studies = (ROOT / "tests" / "results" / "README.md").read_text()
    assert aggregate.full_table() in studies, (
        "the studies page's aggregate tables differ from the committed summaries: paste `python tests/aggregate.py --full`"
    )
    assert results_at_a_glance.table() in studies, (
        "the studies page's per-task table differs from the committed summaries: paste `python tests/results_at_a_glance.py`"
    )


@pytest.mark.parametrize("page", ["README.md", "tests/results/README.md"])
def test_the_choosing_delta_table_is_what_the_committed_summaries_give(page):
    """The AUC-by-δ table of "Choosing δ", in both pages: means, stds, seed counts and the bold best of a column."""
    assert results_at_a_glance.delta_table() in (ROOT / page).read_text(), (
        f"{page}'s table of δ differs from the committed summaries: paste `python tests/results_at_a_glance.py --delta`"
    )


def test_the_gate_table_of_the_delta_study_is_what_the_committed_summaries_give():
    assert results_at_a_glance.gate_table() in (ROOT / "tests" / "results" / "README.md").read_text(), (
        "the δ study's table of what the gate did differs from the committed summaries: paste "
        "`python tests/results_at_a_glance.py --gates`"
    )


@pytest.mark.parametrize("name", ["llm_lag_study", "llm_tv_delta", "llm_floor"])
def test_an_llm_report_is_what_the_committed_summaries_give(tmp_path, name):
    """Each LLM report is what the command it names writes with --report-only from the committed summaries (the runs
    without one listed as missing); the lag study's plot is written beside it and the studies page shows its tables."""
    committed = (ROOT / "tests" / "results" / f"{name}.md").read_text()
    command = re.search(r"^`python tests/benchmark_lag\.py (.+)` \(", committed, re.M).group(1)
    rerun = [sys.executable, "tests/benchmark_lag.py", *shlex.split(command), "--report-only", "--results-dir", str(tmp_path)]
    result = subprocess.run(
        rerun, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = (tmp_path / f"{name}.md").read_text().replace(f" --results-dir {tmp_path}", "")
    assert written == committed, f"{name}.md differs from the committed summaries: run its command with --report-only"
    if name == "llm_lag_study":
        assert (tmp_path / "llm_lag_study_accuracy.png").stat().st_size > 10_000
        studies = (ROOT / "tests" / "results" / "README.md").read_text()
        tables = re.findall(r"(?:^\|.*\|\n)+", committed, re.M)
        assert len(tables) == 2 and all(table in studies for table in tables), "paste llm_lag_study.md's two tables"


def test_the_llm_memory_table_is_what_its_records_give():
    """Each row of "LLM: peak memory" links the record of its run (the script's output, its scratch probe's peaks by
    phase and `/usr/bin/time -v`) and shows what the record holds: the peak with the generator alone, the peak while
    the learner updates, the maximum resident set (KiB, in 10^9 bytes), and the seconds per step the script printed."""
    studies = (ROOT / "tests" / "results" / "README.md").read_text()
    rows = re.findall(r"^\| \[[^]]+\]\((llm_memory/\w+\.txt)\)[^|]* \| (.+) \|$", studies, re.M)
    assert len(rows) == 5, "the memory table should have a row per record"
    for path, cells in rows:
        record = (ROOT / "tests" / "results" / path).read_text()
        phases = ast.literal_eval(re.search(r"peak RSS GB by phase: (\{.*\})", record).group(1))
        peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", record).group(1))
        train_s = ", ".join(f"{float(s):.0f}" for s in re.findall(r" train ([\d.]+)s", record))
        generate_s = ", ".join(f"{float(s):.0f}" for s in re.findall(r" gen ([\d.]+)s", record))
        expected = [
            f"{phases['generate']:.2f}",
            f"{phases['any update']:.2f}",
            f"{peak_kib * 1024 / 1e9:.2f}",
            train_s,
            generate_s,
        ]
        assert [cell.strip("*") for cell in cells.split(" | ")] == expected, f"the row of {path} differs from the record"


def test_the_llm_precision_table_is_what_its_records_give():
    """The table of each compute precision's floor and cost is what tests/llm_precision.py --report-only prints from
    the committed records, every precision at the same seeds."""
    records = json.loads((ROOT / "tests" / "results" / "llm_precision.json").read_text())["records"]
    seeds = {
        precision: sorted(r["seed"] for r in records if r["precision"] == precision) for precision in llm_precision.AUTOCAST
    }
    assert len(set(map(tuple, seeds.values()))) == 1 and len(seeds["float16"]) >= 3, seeds
    studies = (ROOT / "tests" / "results" / "README.md").read_text()
    assert llm_precision.table(records) in studies, "paste `python tests/llm_precision.py --report-only`"


def test_readme_is_at_most_26000_bytes():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 26000, f"README.md is {size} bytes; move detail to tests/results/README.md or the scripts"


def test_readme_links_to_every_study():
    """Each section (##) of tests/results/README.md is linked from the front page, so no study is out of reach."""
    studies = (ROOT / "tests" / "results" / "README.md").read_text()
    sections = github_anchors(
        "\n".join(re.findall(r"^## .+$", re.sub(r"^```.*?^```", "", studies, flags=re.S | re.M), flags=re.M))
    )
    linked = {
        target.split("#", 1)[1]
        for target in links((ROOT / "README.md").read_text())
        if target.startswith("tests/results/README.md#")
    }
    assert sections - linked == set(), f"README.md does not link these studies: {sorted(sections - linked)}"


def test_the_studies_page_lists_every_table_and_plot():
    """Every table and plot under tests/results is in the studies page's list at its end, so none is out of reach."""
    studies = (ROOT / "tests" / "results" / "README.md").read_text()
    listed = set(links(studies[studies.index("| per-seed table | plot |") :]))
    files = {path.name for path in (ROOT / "tests" / "results").iterdir() if path.suffix in (".md", ".png")}
    files -= {"README.md", "at_a_glance.png", "at_a_glance_per_task.png"}  # the page itself; the glance's figures
    assert files - listed == set(), f"not in the list of every table and plot: {sorted(files - listed)}"
