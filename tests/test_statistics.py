"""The evidence report's statistics without running a model: the Student-t quantile, the seed-level t interval,
the bootstrap's p-value and levels, Holm's correction, and the per-pair verdicts built from them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evidence_report import PAIRS, print_pairs
from paired_stats import (bootstrap_interval, bootstrap_p, claims, holm, pair_statistics, paired_bootstrap,
                          paired_bootstrap_means, seed_t_interval, t_cdf, t_quantile, t_two_sided_p)


def grid_with_seed_differences(differences: list[float], questions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two paired 0/1 grids whose per-seed accuracy differences are exactly `differences` (multiples of 1/questions)."""
    rng = np.random.default_rng(seed)
    b = (rng.random((len(differences), questions)) < 0.5).astype(int)
    a = b.copy()
    for row, d in enumerate(differences):
        flips = round(abs(d) * questions)
        candidates = np.flatnonzero(b[row] == (0 if d > 0 else 1))  # right answers gained, or lost
        a[row, rng.choice(candidates, flips, replace=False)] = 1 if d > 0 else 0
    return a, b


# ---------------------------------------------------------------- Student's t

@pytest.mark.parametrize("p, df, expected", [(0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.995, 2, 9.9248),
                                             (0.975, 30, 2.0423), (0.975, 1, 12.7062), (0.95, 10, 1.8125)])
def test_t_quantile_matches_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-5)


def test_t_quantile_is_symmetric_inverts_the_cdf_and_tends_to_the_normal():
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4), rel=1e-12)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    for p, df in [(0.9975, 1), (0.6, 7), (0.999, 3.5)]:
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_t_cdf_against_closed_forms():
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(t)/pi
    assert t_cdf(-3.0, 1) == pytest.approx(0.5 + math.atan(-3.0) / math.pi, abs=1e-12)
    for t in (0.3, 1.5, 7.0):  # two degrees of freedom: 1/2 + t / (2 sqrt(2 + t^2))
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        assert t_cdf(-t, 2) == pytest.approx(1 - t_cdf(t, 2), abs=1e-12)
    assert t_two_sided_p(4.302653, 2) == pytest.approx(0.05, abs=1e-6)
    assert t_two_sided_p(0.0, 5) == 1.0 and t_two_sided_p(math.inf, 5) == 0.0


# ---------------------------------------------------------------- the seed-level t interval

def test_seed_t_interval_is_the_t_interval_of_the_per_seed_differences():
    a, b = grid_with_seed_differences([0.10, -0.05, 0.02], 400)
    mean, low, high, p = seed_t_interval(a, b, 0.95)
    d = np.array([0.10, -0.05, 0.02])
    se = d.std(ddof=1) / math.sqrt(3)
    assert mean == pytest.approx(d.mean(), abs=1e-12)
    assert (low, high) == pytest.approx((d.mean() - 4.302653 * se, d.mean() + 4.302653 * se), abs=1e-6)
    t = d.mean() / se
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)  # the df = 2 closed form
    _, low99, high99, _ = seed_t_interval(a, b, 0.99)
    assert low99 < low and high < high99


def test_seed_t_interval_is_wider_than_the_bootstrap_when_seeds_disagree():
    # three seeds that disagree, many questions: the spread is the seeds', which a bootstrap of 3 seeds underrates
    a, b = grid_with_seed_differences([0.10, -0.05, 0.02], 3000)
    _, seed_low, seed_high, _ = seed_t_interval(a, b, 0.95)
    _, boot_low, boot_high = paired_bootstrap(a, b, 1000)
    assert seed_high - seed_low > 2 * (boot_high - boot_low)
    assert seed_low < boot_low and boot_high < seed_high


def test_one_seed_has_no_seed_level_interval():
    a, b = grid_with_seed_differences([0.2], 500)
    assert seed_t_interval(a, b, 0.95) == (pytest.approx(0.2), -math.inf, math.inf, 1.0)


def test_seeds_that_agree_exactly_give_a_point():
    a, b = grid_with_seed_differences([0.05, 0.05], 200)
    assert seed_t_interval(a, b) == (pytest.approx(0.05), pytest.approx(0.05), pytest.approx(0.05), 0.0)
    assert seed_t_interval(b, b) == (0.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------- the bootstrap

def test_bootstrap_p_is_twice_the_smaller_tail_floored_and_capped():
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.5)
    assert bootstrap_p(np.array([-1.0, 0.0, 2.0, 3.0])) == pytest.approx(1.0)  # 0 counts on both sides
    assert bootstrap_p(np.full(200, 0.3)) == pytest.approx(1 / 200)  # never 0: 200 resamples show no more
    assert bootstrap_p(np.zeros(50)) == 1.0


def test_bootstrap_levels_and_p_come_from_the_same_resamples():
    a, b = grid_with_seed_differences([0.06, 0.04, 0.05], 1000)
    means = paired_bootstrap_means(a, b, 500)
    diff, low, high = paired_bootstrap(a, b, 500)  # the old signature and 95% interval, unchanged
    assert (low, high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert bootstrap_interval(means, 0.95) == (low, high)
    _, low99, high99 = paired_bootstrap(a, b, 500, level=0.99)
    assert (low99, high99) == bootstrap_interval(means, 0.99) and low99 < low and high < high99
    assert 0 < low and bootstrap_p(means) == pytest.approx(1 / 500)
    null = paired_bootstrap_means(b, b, 300)
    assert bootstrap_p(null) == 1.0


# ---------------------------------------------------------------- Holm

def test_holm_textbook_example():
    adjusted, levels = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert levels == pytest.approx([1 - 0.05 / 3, 0.95, 0.975, 1 - 0.05 / 4])


def test_holm_is_monotone_capped_and_takes_alpha():
    adjusted, _ = holm([0.5, 0.6, 0.001])
    assert adjusted == pytest.approx([1.0, 1.0, 0.003])
    _, levels = holm([0.2, 0.1], alpha=0.1)
    assert levels == pytest.approx([0.9, 0.95])
    assert holm([]) == ([], [])


# ---------------------------------------------------------------- per-pair claims

def test_claims_keys_and_verdicts():
    up = pair_statistics(*grid_with_seed_differences([0.09, 0.10, 0.11, 0.10, 0.12], 500, seed=1), 1000)
    a, b = grid_with_seed_differences([-0.09, -0.10, -0.11, -0.10, -0.12], 500, seed=2)
    down = pair_statistics(a, b, 1000)
    null = pair_statistics(*grid_with_seed_differences([0.02, -0.03, 0.01, 0.0, -0.01], 500, seed=3), 1000)
    rows = claims([up, down, null])
    assert [row["verdict"] for row in rows] == ["supported (+)", "supported (-)", "not shown"]
    first = rows[0]
    assert first["claim_p"] == max(first["bootstrap_p"], first["t_p"])
    assert first["adjusted_level"] == pytest.approx(1 - 0.05 / 3)  # the smallest p meets the strictest level
    assert first["claim_low"] == min(first["adjusted_low"], first["adjusted_seed_low"]) > 0
    assert first["claim_high"] == max(first["adjusted_high"], first["adjusted_seed_high"])
    assert first["claim_low"] < first["seed_low"] and first["claim_low"] < first["low"]
    assert first["diff"] == pytest.approx(0.104) and first["seed_low"] < 0.104 < first["seed_high"]
    # the largest p is ranked last: Holm leaves it as it is, at the plain 95% level
    assert rows[2]["holm_p"] == rows[2]["claim_p"] > 0.5 and rows[2]["adjusted_level"] == pytest.approx(0.95)
    json.dumps(rows, allow_nan=False)  # results.json stays standard JSON


def test_holm_takes_back_a_claim_that_stands_alone():
    # per-seed differences 0.04, 0.06, 0.08: t = 5.196 on 2 df, p = 0.035, below 0.05 alone but not doubled
    lone = pair_statistics(*grid_with_seed_differences([0.04, 0.06, 0.08], 1000, seed=4), 1000)
    null = pair_statistics(*grid_with_seed_differences([0.01, -0.01, 0.0], 1000, seed=5), 1000)
    alone, = claims([lone])
    assert alone["t_p"] == pytest.approx(0.0351, abs=1e-4) and alone["claim_p"] == alone["t_p"]
    assert alone["verdict"] == "supported (+)" and alone["claim_low"] > 0
    together = claims([lone, null])[0]
    assert together["holm_p"] == pytest.approx(2 * alone["t_p"]) and together["verdict"] == "not shown"
    assert together["claim_low"] < 0 < together["claim_high"]


def test_one_seed_supports_nothing_however_clear_the_questions():
    stats = pair_statistics(*grid_with_seed_differences([0.3], 1000), 500)
    row, = claims([stats])
    assert row["low"] > 0.25  # the questions alone would say yes
    assert row["seed_low"] is None and row["seed_high"] is None and row["claim_low"] is None
    assert row["t_p"] == 1.0 and row["holm_p"] == 1.0 and row["verdict"] == "not shown"


def test_print_pairs_shows_each_pair_readably(capsys):
    rows = claims([pair_statistics(*grid_with_seed_differences([0.09, 0.10, 0.11], 300), 400),
                   pair_statistics(*grid_with_seed_differences([0.02, -0.03, 0.01], 300), 400)])
    pairs = [{"a": "tailored-m1", "b": "tailored-no-reflect", "label": "the same at margin 1.0", "split": "test",
              "seeds": 3, "questions": 300, **rows[0]},
             {"a": "std-cot", "b": "student", "label": "distillation", "split": "test", "seeds": 3, "questions": 300,
              **rows[1]}]
    print_pairs(pairs)
    out = capsys.readouterr().out
    assert all(len(line) < 150 for line in out.splitlines())
    assert "tailored-m1 - tailored-no-reflect: the same at margin 1.0" in out
    first = pairs[0]
    assert f"{first['diff']:+.4f} [{first['low']:+.4f}, {first['high']:+.4f}] [{first['seed_low']:+.4f}," in out
    assert f"{first['holm_p']:.4f}  [{first['claim_low']:+.4f}, {first['claim_high']:+.4f}] " \
           f"({100 * first['adjusted_level']:.2f}%)" in out
    assert out.count("supported (+)") == 1 and out.count("not shown") == 1
    assert "Holm p over the 2 pairs shown" in out and "one seed" not in out

    one = claims([pair_statistics(*grid_with_seed_differences([0.1], 300), 200)])
    print_pairs([{**pairs[1], "seeds": 1, **one[0]}])
    out = capsys.readouterr().out
    assert "[-inf, +inf]" in out and "one seed: the seed t interval is unbounded" in out


def test_pairs_name_known_arms_in_order():
    from arms import EVIDENCE_ARMS

    assert [(a, b) for a, b, _ in PAIRS] == [
        ("std-cot", "student"), ("+reflect", "std-cot"), ("+reflect-m1", "std-cot"), ("tailored", "+reflect"),
        ("tailored", "untailored"), ("tailored", "more-epochs"), ("tailored", "tailored-no-reflect"),
        ("tailored-m1", "tailored-no-reflect"), ("tailored", "student"), ("+prefer", "+reflect")]
    assert all(a in EVIDENCE_ARMS and b in EVIDENCE_ARMS and label for a, b, label in PAIRS)
