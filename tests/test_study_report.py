"""The study's report: its answers and target read off the paired intervals, the coverage summary,
the study record that keeps every seed of its invocations, and publishing into RESULTS.md."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from sims.paper.report import STUDY_END, STUDY_START, TITLES
from sims.paper.report import write_report as write_paper_report
from sims.study.answers import answer_lines, target_lines, verdict
from sims.study.coverage import run_coverage, summarize_coverage
from sims.study.plan import STUDY, override
from sims.study.publish import publish, splice
from sims.study.report import command_line, render, summarize
from sims.study.runner import _study_meta

DOCS = Path(__file__).resolve().parents[1] / "docs"


def pair(alpha: float, a: str, b: str, mean: float, low: float, high: float, a_name: str = "") -> dict:
    return {"alpha": alpha, "a": a, "a_name": a_name or a, "subtrahend": b, "seeds": 5,
            "mean": mean, "low": low, "high": high}  # fmt: skip


def test_a_verdict_needs_the_interval_on_one_side_at_every_alpha() -> None:
    assert verdict([pair(0.3, "a", "b", 0.02, 0.01, 0.03), pair(1, "a", "b", 0.01, 0.001, 0.02)]) == "yes"
    assert verdict([pair(0.3, "a", "b", -0.02, -0.03, -0.01)] * 2) == "no"
    assert verdict([pair(0.3, "a", "b", 0.02, 0.01, 0.03), pair(1, "a", "b", 0.01, -0.01, 0.03)]) == "not resolved"
    assert verdict([pair(0.3, "a", "b", 0.02, 0.01, 0.03), None]) == "not run"
    nan = pair(0.3, "a", "b", 0.02, math.nan, math.nan)  # one seed: no interval
    assert verdict([nan]) == "not resolved"


def test_the_answers_and_the_target_come_from_the_paired_rows() -> None:
    alphas = (0.3, 1.0)
    paired = [
        *(pair(a, "best mixed", "strong-only", 0.06, 0.04, 0.08, "random") for a in alphas),
        *(pair(a, "velocity-per-param", "strong-only", 0.05, 0.03, 0.07) for a in alphas),
        *(pair(a, "best mixed", "dense", -0.01, -0.02, 0.0, "random") for a in alphas),
        *(pair(a, "velocity-per-param", "random", -0.005, -0.02, 0.01) for a in alphas),
        *(pair(a, "vpp-fednova", "velocity-per-param", 0.02, 0.01, 0.03) for a in alphas),
        pair(0.3, "vpp-fedadam", "velocity-per-param", -0.03, -0.05, -0.01),
    ]
    text = "\n".join(answer_lines(alphas, paired))
    assert "over strong-only FedAvg?** yes. Best mixed method (α = 0.3: random, α = 1: random)" in text
    assert "+6.0 [+4.0, +8.0] (5 seeds)" in text
    assert "velocity / param, FedNova per element beats sparse-fedavg at every α" in text
    assert "FedAdam per element − velocity / param: not run" in text  # no α = 1 row
    assert "Random: not resolved" in text and "Static: not run" in text
    target = " ".join(target_lines(alphas, paired))
    assert "interval above 0 at every α: met" in target and "of all-dense FedAvg: met" in target
    short = [p for p in paired if not (p["a"] == "best mixed" and p["subtrahend"] == "strong-only")]
    short += [pair(a, "best mixed", "strong-only", 0.035, 0.01, 0.06, "random") for a in alphas]
    assert "at every α: not met (α = 0.3: +3.5; α = 1: +3.5)" in " ".join(target_lines(alphas, short))
    assert "Headroom" not in " ".join(target_lines(alphas, short))  # dense − strong-only not run
    short += [pair(a, "dense", "strong-only", 0.04, 0.03, 0.05) for a in alphas]
    assert ("**Headroom:** all-dense FedAvg − strong-only (no mixed fleet can gain more): α = 0.3: +4.0 "
            "[+3.0, +5.0], of which the best mixed recovers 88 %") in " ".join(target_lines(alphas, short))


def test_best_mixed_is_chosen_among_mixed_fleet_variants_and_every_rule_is_paired() -> None:
    study = override(STUDY, ["seeds=0,1,2", "alphas=1.0",
                             "variants=velocity-per-param,random,strong-only,dense,vpp-fednova"])  # fmt: skip
    tails = {"velocity-per-param": 0.90, "random": 0.91, "strong-only": 0.80, "dense": 0.95, "vpp-fednova": 0.93}
    runs = [{"alpha": 1.0, "variant": v, "seed": s, "tail_accuracy": t + 0.01 * s, "final_accuracy": t,
             "slope_per_100_rounds": 0.0, "seconds_per_round": 1.0} for v, t in tails.items() for s in range(3)]  # fmt: skip
    _, paired = summarize(study, runs)
    rows = {(p["a"], p["subtrahend"]): p for p in paired}
    assert rows[("best mixed", "strong-only")]["a_name"] == "vpp-fednova"  # dense is not a mixed fleet
    assert rows[("vpp-fednova", "velocity-per-param")]["mean"] == pytest.approx(0.03)
    assert rows[("velocity-per-param", "strong-only")]["mean"] == pytest.approx(0.10)
    assert rows[("dense", "strong-only")]["mean"] == pytest.approx(0.15)  # the headroom


def test_the_summary_table_gives_the_slope_in_points_per_100_rounds() -> None:
    study = override(STUDY, ["seeds=0,1", "alphas=1.0", "variants=velocity-per-param"])
    # accuracy 0.80 -> 0.81 over the last 50 rounds: +1 point in 50 rounds, +2 points per 100
    runs = [{"alpha": 1.0, "variant": "velocity-per-param", "seed": s, "tail_accuracy": 0.805,
             "final_accuracy": 0.81, "slope_per_100_rounds": 0.02, "seconds_per_round": 1.0,
             "commits": "", "seconds": 0.0} for s in range(2)]  # fmt: skip
    summary, _ = summarize(study, runs)
    page = render(study, {}, runs, summary, [], [])
    row = next(line for line in page.splitlines() if line.startswith("| 1 | velocity / param"))
    assert "| 80.5 ± 0.0 |" in row and "| +2.00 ± 0.00 |" in row


def test_the_page_names_the_command_that_reruns_its_study() -> None:
    study = override(STUDY, ["seeds=0,1", "alphas=0.3,1.0", "model=mobilenet_v2", "width_mult=0.5",
                             "lr=0.03", "variants=velocity-per-param,dense"])  # fmt: skip
    command = command_line(study)
    assert command_line(STUDY) == "python -m sims.study"
    assert override(STUDY, command.split("--set ")[1:]) == study  # the same study, parsed back
    assert f"`{command}`" in render(study, {}, [], [], [], [])


def test_coverage_is_averaged_over_rounds_then_weighted_by_elements(tmp_path: Path) -> None:
    (tmp_path / "coverage.csv").write_text(
        "round,tensor,elements,clients,min,median,mean,max,uncovered\n"
        "1,body,300,4,0,1,1.0,2,0.5\n2,body,300,4,0,3,2.0,4,0.0\n"
        "1,head,100,4,4,4,4.0,4,0\n2,head,100,4,2,2,2.0,2,0\n"
    )  # fmt: skip
    rows = run_coverage(tmp_path, {"alpha": 1.0, "variant": "random", "seed": 0})
    body = next(r for r in rows if r["tensor"] == "body")
    assert (body["median"], body["min"], body["uncovered"]) == (2.0, 0.0, 0.25)
    (s,) = summarize_coverage(rows)
    assert s["median"] == pytest.approx((300 * 2 + 100 * 3) / 400)
    assert s["uncovered"] == pytest.approx(300 * 0.25 / 400)
    assert (s["lowest"], s["highest"], s["highest_median"]) == ("body", "head", 3.0)


def test_the_study_record_keeps_every_seed_of_its_invocations(tmp_path: Path) -> None:
    first = override(STUDY, ["seeds=0,1,2"])
    (tmp_path / "study.json").write_text(json.dumps(_study_meta(first, tmp_path)))
    meta = _study_meta(override(STUDY, ["seeds=3,4", "variants=velocity-per-param,vpp-fednova"]), tmp_path)
    assert meta["study"]["seeds"] == [0, 1, 2, 3, 4]
    assert meta["study"]["variants"] == [*STUDY.variants, "vpp-fednova"]
    assert set(meta["study"]["variant_definitions"]) == set(meta["study"]["variants"])
    with pytest.raises(ValueError, match="other settings"):
        _study_meta(override(STUDY, ["num_clients=50"]), tmp_path)


def test_the_study_block_is_spliced_under_the_heterogeneous_heading_then_replaced() -> None:
    page = f"# Results\n\n## {TITLES['heterogeneous']}\n\n| table |\n\n## Reading\n"
    once = splice(page, "### Study\n\nfirst")
    assert once.index(STUDY_START) > once.index(TITLES["heterogeneous"]) and "| table |" in once
    twice = splice(once, "### Study\n\nsecond")
    assert "second" in twice and "first" not in twice and twice.count(STUDY_START) == 1
    assert splice("# Other\n", "x").endswith(f"{STUDY_START}\nx\n{STUDY_END}\n")


def test_a_published_study_survives_the_paper_page_being_regenerated(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(DOCS / "results", docs / "results", ignore=shutil.ignore_patterns("study", "*.png"))
    shutil.copy(DOCS / "RESULTS.md", docs / "RESULTS.md")
    out = tmp_path / "study"
    out.mkdir()
    (out / "paired.csv").write_text("alpha\n1\n")
    publish(out, docs, "## Heterogeneous fleet: long-horizon study\n\n### Paired differences\n\nrows",
            ["paired.csv", "curves_alpha1.png"])  # a file the study lacks is skipped
    assert (docs / "results/study/paired.csv").read_text() == "alpha\n1\n"
    page = write_paper_report(None, docs).read_text()
    block = page.split(STUDY_START, 1)[1].split(STUDY_END, 1)[0]
    assert "### Heterogeneous fleet: long-horizon study" in block and "#### Paired differences" in block
    assert page.index(STUDY_END) < page.index("a short run (12 rounds)") < page.index("## Reading")


def test_an_incomplete_study_says_so_first() -> None:
    from sims.study.plan import expand

    study = override(STUDY, ["seeds=0,1", "alphas=1.0", "variants=velocity-per-param,strong-only"])
    partial = render(study, {}, [{"commits": "", "seconds": 0.0}], [], [], [])
    assert "**In progress:** 1 of 4 runs complete" in partial.split("**The three questions**")[0]
    complete = render(study, {}, [{"commits": "", "seconds": 0.0}] * len(expand(study)), [], [], [])
    assert "In progress" not in complete


def test_a_run_that_failed_is_left_out_of_the_report(tmp_path: Path) -> None:
    """A run whose engine died records its remaining rounds (all failed): it has every row of
    rounds.csv but is not complete, and its frozen model must not enter the tables."""
    import tarfile

    from sims.study.report import collect

    study = override(STUDY, ["seeds=0", "alphas=0.3", "variants=velocity-per-param"])
    run_dir = tmp_path / "alpha0.3/velocity-per-param/seed0"
    with tarfile.open(Path(__file__).parent.parent / "docs/results/study/runs" / "alpha0.3/velocity-per-param/seed0.tar.xz") as tar:
        tar.extractall(run_dir, filter="data")
    assert len(collect(study, tmp_path)[0]) == 1
    (run_dir / "status.json").write_text(json.dumps({"status": "failed", "reason": "round(s) [300]"}))
    assert collect(study, tmp_path)[0] == []
