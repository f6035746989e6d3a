"""live_eval.py: the over-optimisation alarm on made-up metric streams, the best checkpoint by --select_by, the
stop, and what a resumed run keeps; the PPO, GRPO and DPO runs that log it are in their own tests."""

from types import SimpleNamespace

import pytest
import torch

import live_eval
from lifecycle import UserError
from live_eval import Monitor, alarm_line, alarm_metrics, overoptimization


def evaluation(step, proxy, gold=None, oracle=None, se=0.05):
    record = {"step": step, "eval/proxy": proxy, "eval/proxy_se": se, "eval/reward": proxy}
    if gold is not None:
        record |= {"eval/gold": gold, "eval/gold_se": se}
    if oracle is not None:
        record |= {"eval/oracle": oracle, "eval/oracle_se": se}
    return record


def test_the_alarm_fires_where_the_proxy_rises_and_the_gold_falls_beyond_their_noise():
    history = [evaluation(0, 1.0, gold=1.0), evaluation(10, 1.2, gold=0.9), evaluation(20, 1.5, gold=0.7)]
    alarm = overoptimization(history, window=2)  # step 20 against step 0: proxy +0.5, gold -0.3; noise 0.07 each
    assert alarm == {"step": 20, "since": 0, "proxy": (1.0, 1.5), "gold": (1.0, 0.7)}
    assert alarm_line(alarm) == (
        "over-optimisation alarm at step 20: since step 0 the proxy rose while the gold fell, each beyond its noise "
        "(proxy +1.000 -> +1.500, gold 1.000 -> 0.700)"
    )
    assert alarm_metrics(alarm) == pytest.approx(
        {"alarm/overoptimization": 1.0, "alarm/proxy_rise": 0.5, "alarm/gold_drop": 0.3}
    )
    assert overoptimization(history, window=1)["since"] == 10  # 1.2 -> 1.5 against 0.9 -> 0.7
    assert overoptimization(history, window=3) is None  # not that many evaluations yet


@pytest.mark.parametrize(
    "history, why",
    [
        ([evaluation(0, 1.0, gold=1.0), evaluation(10, 1.5, gold=1.3)], "both rise"),
        ([evaluation(0, 1.0, gold=1.0), evaluation(10, 0.8, gold=0.7)], "both fall"),
        ([evaluation(0, 1.0, gold=1.0), evaluation(10, 1.05, gold=0.7)], "the proxy's rise is within its noise"),
        ([evaluation(0, 1.0, gold=1.0), evaluation(10, 1.5, gold=0.95)], "the gold's fall is within its noise"),
        ([evaluation(0, 1.0), evaluation(10, 1.5)], "no judge beside the proxy"),
    ],
)
def test_the_alarm_stays_quiet(history, why):
    assert overoptimization(history, window=1) is None, why


def test_on_tiny_data_the_oracle_fires_it_where_the_gold_shares_the_proxys_blind_spot():
    history = [evaluation(0, 1.0, gold=1.0, oracle=0.8), evaluation(8, 1.4, gold=1.3, oracle=0.6)]
    alarm = overoptimization(history, window=1)
    assert alarm["oracle"] == (0.8, 0.6) and "gold" not in alarm
    assert "the proxy rose while the oracle fell" in alarm_line(alarm)
    noisy = [evaluation(0, 1.0, oracle=0.8, se=0.2), evaluation(8, 1.4, oracle=0.6, se=0.2)]
    assert overoptimization(noisy, window=1) is None  # 0.2 down against a noise of 0.28: not beyond it


class ScriptedLive:
    """A LiveEval stand-in that returns made-up held-out metrics, one set per call."""

    def __init__(self, stream):
        self.stream, self.prompts, self.gold = iter(stream), ["a prompt"] * 4, object()

    def __call__(self, policy):
        return next(self.stream), [(0.5, "a reply")], 100


def args(**kw):
    return SimpleNamespace(**{"select_by": "proxy", "alarm_window": 1, "stop_on_overoptimization": False, **kw})


STREAM = [  # proxy climbs all along; gold peaks at step 10; the oracle at step 20
    {"eval/reward": 1.0, "eval/proxy": 1.0, "eval/gold": 1.0, "eval/oracle": 0.5, "eval/sample_kl": 0.0},
    {"eval/reward": 1.2, "eval/proxy": 1.2, "eval/gold": 1.4, "eval/oracle": 0.6, "eval/sample_kl": 1.0},
    {"eval/reward": 1.4, "eval/proxy": 1.4, "eval/gold": 1.3, "eval/oracle": 0.7, "eval/sample_kl": 2.0},
    {"eval/reward": 1.9, "eval/proxy": 1.9, "eval/gold": 0.6, "eval/oracle": 0.3, "eval/sample_kl": 5.0},
]


@pytest.mark.parametrize("select_by, step", [("proxy", 30), ("gold", 10), ("oracle", 20)])
def test_select_by_keeps_the_step_its_score_peaks_at_with_those_weights(select_by, step):
    monitor, model, said = Monitor(ScriptedLive(STREAM), args(select_by=select_by)), torch.nn.Linear(2, 1), []
    for n in range(4):
        with torch.no_grad():
            model.weight.fill_(n * 10)  # the weights "at step n * 10"
        monitor(n * 10, model, say=said.append)
    assert monitor.best.saved["step"] == step and monitor.best.saved["select_by"] == select_by
    assert monitor.best.saved["state"]["weight"].eq(step).all()  # the weights of that step, copied
    assert monitor.best.info(4) == {"step": step, "select_by": select_by, live_eval.SELECT_KEYS[select_by]: pytest.approx(
        STREAM[step // 10][live_eval.SELECT_KEYS[select_by]]), "eval_prompts": 4}  # fmt: skip
    assert said[0] == "step 0 | held out (4 prompts): proxy +1.000, gold +1.000, oracle +0.500, KL 0.00"


def test_the_alarm_stops_the_run_where_asked_and_a_resume_keeps_it_stopped():
    stream = [{**s, "eval/proxy_se": 0.01, "eval/gold_se": 0.01} for s in STREAM]
    monitor, model, said = Monitor(ScriptedLive(stream), args(stop_on_overoptimization=True)), torch.nn.Linear(2, 1), []
    metrics = [monitor(n * 10, model, say=said.append) for n in range(3)]
    assert "alarm/overoptimization" not in metrics[0] | metrics[1]  # gold rose with the proxy at step 10
    assert monitor.stop and monitor.stopped == 20  # 1.2 -> 1.4 while gold 1.4 -> 1.3
    assert metrics[2]["alarm/overoptimization"] == 1.0 and metrics[2]["alarm/gold_drop"] == pytest.approx(0.1)
    assert said[-1].startswith("over-optimisation alarm at step 20: since step 10") and said[-1].endswith(
        "; stopping (--stop_on_overoptimization)"
    )
    resumed = Monitor(ScriptedLive([]), args(stop_on_overoptimization=True), monitor.state())
    assert resumed.stopped == 20 and [h["step"] for h in resumed.history] == [0, 10, 20]
    assert resumed.best.saved["step"] == 20
    assert resumed.finished_line() == (
        "the run stopped at step 20 on the over-optimisation alarm (--stop_on_overoptimization): finished"
    )
    with pytest.raises(UserError, match="picks its best checkpoint by proxy; resume with --select_by proxy"):
        Monitor(ScriptedLive([]), args(select_by="gold"), monitor.state())


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"eval_every": -1}, "--eval_every must be >= 0 (0 = no held-out evaluation), got -1"),
        ({"eval_prompts": 0}, "--eval_prompts and --eval_batch_size must be >= 1"),
        ({"alarm_window": 0}, "--alarm_window must be >= 1, got 0"),
        ({"eval_every": 0, "select_by": "gold"}, "--select_by gold|oracle and --stop_on_overoptimization need"),
    ],
)
def test_bad_flags_are_one_line(flags, message):
    settings = {"eval_every": 5, "eval_prompts": 4, "eval_batch_size": 4, "alarm_window": 2}
    with pytest.raises(UserError, match=message.replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")):
        live_eval.check_live_eval_args(args(**settings | flags))


FIRES_AT_4 = {  # each script's run: the flags that make its held-out evaluations fall at steps 2 and 4
    "PPO_training": ["--total_steps", 6, "--rollout_batch_size", 4, "--max_new_tokens", 8, "--test_prompts", 0],
    "GRPO_training": ["--total_steps", 6, "--rollout_batch_size", 2, "--group_size", 2, "--max_new_tokens", 8],
    "DPO_training": ["--max_steps", 6, "--per_device_train_batch_size", 4, "--max_eval_samples", 8, "--eval_steps", 0],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(FIRES_AT_4))
def test_a_run_the_alarm_stops_ends_there_saved_and_a_resume_says_it_is_finished(script, work, monkeypatch, capsys):
    """--stop_on_overoptimization in PPO, GRPO and DPO (the alarm made to fire at step 4): the run ends at step 4
    with its checkpoint, final folder and best folder, the alarm in metrics.jsonl; --resume finishes nothing more."""
    import importlib

    from lifecycle import parse_args
    from reporting import read_metrics

    module = importlib.import_module(script)
    fire = {"step": 4, "since": 2, "proxy": (1.0, 2.0), "gold": (1.0, 0.5)}
    monkeypatch.setattr(
        live_eval, "overoptimization", lambda history, window: fire if history[-1]["step"] == 4 else None
    )
    argv = [
        "--preset",
        "tiny",
        "--work_dir",
        str(work),
        "--eval_every",
        "2",
        "--eval_prompts",
        "4",
        "--save_every",
        "100",
    ]
    argv += ["--stop_on_overoptimization", *map(str, FIRES_AT_4[script])]
    module.main(parse_args(module.Args, module.TINY, argv))
    out = capsys.readouterr().out + capsys.readouterr().err
    name = script.split("_")[0].lower()
    checkpoint = torch.load(work / "runs" / name / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 4 and checkpoint["monitor"]["stopped"] == 4
    records = read_metrics(work / "runs" / name / "metrics.jsonl")
    assert max(r["step"] for r in records) == 4
    assert [r["step"] for r in records if "alarm/overoptimization" in r] == [4]
    assert [r["step"] for r in records if "eval/proxy" in r] == [0, 2, 4]
    best_dir = {"ppo": "ppo_best", "grpo": "grpo_best", "dpo": "dpo_best"}[name]
    assert (work / best_dir / "best.json").is_file()
    final = {"ppo": "ppo_rlhf_model", "grpo": "grpo_rlhf_model", "dpo": "dpo_rlhf_model"}[name]
    assert "(stopped by the over-optimisation alarm)" in (work / final / "README.md").read_text()
    module.main(parse_args(module.Args, module.TINY, [*argv, "--resume"]))
    out = capsys.readouterr().out
    assert "the run stopped at step 4 on the over-optimisation alarm (--stop_on_overoptimization): finished" in out
    assert max(r["step"] for r in read_metrics(work / "runs" / name / "metrics.jsonl")) == 4  # no step trained after


@pytest.mark.parametrize("reward_funcs", ["model", "model,gold"])
def test_the_gold_model_is_loaded_once_whether_or_not_the_run_trains_on_it(reward_funcs, work, monkeypatch):
    """A run whose --reward_funcs include gold scores its held-out replies with that same gold model, not a second
    copy; one without loads it for the held-out scores alone."""
    from datasets import load_from_disk

    import GRPO_training as grpo
    from common import RewardMix, load_reward_model
    from lifecycle import GOLD_REWARD_MODEL_DIR, PROCESSED_DIR, REWARD_MODEL_DIR, parse_args

    (work / GOLD_REWARD_MODEL_DIR).symlink_to((work / REWARD_MODEL_DIR).resolve())  # any reward model will do
    argv = ["--preset", "tiny", "--work_dir", str(work), "--reward_funcs", reward_funcs, "--eval_prompts", "4"]
    args = parse_args(grpo.Args, grpo.TINY, argv)
    proxy = load_reward_model(args.work_dir, "cpu", args)
    reward = RewardMix(args, "cpu", proxy=proxy)
    loads = []
    monkeypatch.setattr(live_eval, "load_reward_model", lambda *a, **k: loads.append(k) or load_reward_model(*a, **k))
    data = load_from_disk(str(work / PROCESSED_DIR))
    live = live_eval.LiveEval(args, data, proxy[1], None, proxy, "cpu", reward)
    assert live.judges() == "proxy, gold, oracle"
    if "gold" in reward_funcs:
        assert loads == [] and live.gold is reward.models["gold"]
    else:
        assert loads == [{"gold": True}] and "gold" not in reward.models
