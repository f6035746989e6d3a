"""aggregate_seeds.py against a hand computation on made-up evaluations of three seeds, and its one-line errors."""

import math
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO

import aggregate_seeds
from evaluate_models import FRONTIER_CSV, RESULTS_XLSX
from lifecycle import UserError

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (three seeds): from a t table


def summary(ppo_reward, dpo_reward, ppo_oracle):
    """A seed's evaluation summary sheet, as evaluate_models.py writes it (the columns the aggregation reads)."""
    return pd.DataFrame(
        [
            {"model": "base", "reward_mean": 0.0, "reward_ci_low": -0.2, "reward_ci_high": 0.2, "kl_mean": 0.0,
             "oracle_good": 0.5, "distinct_share": 1.0, "length_mean": 30.0},
            {"model": "ppo", "reward_mean": ppo_reward, "reward_ci_low": ppo_reward - 0.3,
             "reward_ci_high": ppo_reward + 0.3, "kl_mean": 2.0, "oracle_good": ppo_oracle, "distinct_share": 0.9,
             "length_mean": 20.0},
            {"model": "dpo", "reward_mean": dpo_reward, "reward_ci_low": dpo_reward - 0.1,
             "reward_ci_high": dpo_reward + 0.1, "kl_mean": 3.0, "oracle_good": 0.8, "distinct_share": 0.95,
             "length_mean": 25.0},
        ]
    )  # fmt: skip


def frontier(shift):
    return pd.DataFrame(
        {"method": ["base", "ppo", "ppo", "best_of_n"], "step": [0, 5, 10, None], "sqrt_kl": [0, 1 + shift, 2, 0],
         "proxy_mean": [0, 1 + shift, 2 + shift, 0], "gold_mean": [0, 1, 1, 0], "oracle_good": [0.5, 0.6, 0.7, 0.5]}
    )  # fmt: skip


@pytest.fixture
def three_seeds(tmp_path):
    for seed, (ppo, dpo, oracle) in {1: (1.0, 2.0, 0.6), 2: (2.0, 3.1, 0.7), 3: (4.0, 4.9, 0.8)}.items():
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        summary(ppo, dpo, oracle).to_excel(folder / RESULTS_XLSX, sheet_name="summary", index=False)
        frontier(seed / 10).to_csv(folder / FRONTIER_CSV, index=False)
    (tmp_path / "seed-4").mkdir()  # started, not evaluated yet: left out
    return tmp_path


def test_the_mean_over_seeds_and_the_t_interval_across_them_match_a_hand_computation(three_seeds, capsys):
    aggregate_seeds.main(type("Args", (), {"work_dir": str(three_seeds)}))
    table = pd.read_csv(three_seeds / aggregate_seeds.SEEDS_CSV).set_index(["method", "figure"])
    ppo = table.loc[("ppo", "reward_mean")]
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    half = T_975_2 * sd / math.sqrt(3)
    assert ppo.seeds == 3 and ppo["mean"] == pytest.approx(mean)
    assert (ppo.seeds_ci_low, ppo.seeds_ci_high) == pytest.approx((mean - half, mean + half))
    assert (ppo.within_ci_low, ppo.within_ci_high) == pytest.approx(
        (mean - 0.3, mean + 0.3)
    )  # the seeds' own, averaged
    assert [ppo.seed_1, ppo.seed_2, ppo.seed_3] == [1.0, 2.0, 4.0]
    assert table.loc[("base", "kl_mean")].seeds_ci_low == 0  # no spread, no width
    assert ("base", "gold_mean") not in table.index  # a figure the evaluations lack is left out

    diffs = pd.read_csv(three_seeds / aggregate_seeds.DIFFERENCES_CSV).set_index(["a", "b", "figure"])
    ppo_dpo = diffs.loc[("ppo", "dpo", "reward_mean")]  # dpo - ppo per seed: 1.0, 1.1, 0.9
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert ppo_dpo.b_minus_a == pytest.approx(1.0)
    assert (ppo_dpo.ci_low, ppo_dpo.ci_high) == pytest.approx((1 - half, 1 + half))
    assert ppo_dpo.holds  # the interval excludes 0
    assert not diffs.loc[("base", "ppo", "reward_mean")].holds  # 1, 2, 4: wide across seeds
    out = capsys.readouterr().out
    assert "3 seeds (1, 2, 3)" in out and "seeds [4] have no evaluation yet: left out" in out

    mean_frontier = pd.read_csv(three_seeds / aggregate_seeds.SEEDS_FRONTIER_CSV)
    ppo5 = mean_frontier[(mean_frontier.method == "ppo") & (mean_frontier.step == 5)].iloc[0]
    assert ppo5.proxy_mean == pytest.approx(1.2) and ppo5.sqrt_kl == pytest.approx(1.2)  # shifts .1, .2, .3
    assert "best_of_n" not in set(mean_frontier.method)
    assert (three_seeds / aggregate_seeds.SEEDS_FRONTIER_PNG).stat().st_size > 10_000


def test_fewer_than_two_evaluated_seeds_is_one_line(tmp_path):
    (tmp_path / "seed-1").mkdir()
    summary(1, 2, 0.5).to_excel(tmp_path / "seed-1" / RESULTS_XLSX, sheet_name="summary", index=False)
    with pytest.raises(UserError, match="1 seed folder"):
        aggregate_seeds.main(type("Args", (), {"work_dir": str(tmp_path)}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "aggregate_seeds.py"), "--work_dir", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {tmp_path}: 1 seed folder(s) with {RESULTS_XLSX} (seed-N/ from run_pipeline.sh --seeds); an interval "
        "across seeds needs at least 2"
    )
