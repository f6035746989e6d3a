"""Held-out scores while a policy trains, by every judge there is; the over-optimisation alarm; the best checkpoint.

PPO, GRPO and DPO call a `LiveEval` every `--eval_every` steps and at step 0 (the model they start from): one
sampled reply to each of the first `--eval_prompts` prompts of processed_data/'s validation split (the same prompts
for the three methods, never the test prompts the final evaluation reports, so choosing a checkpoint by them does
not leak into its table), each time from the same seeded random stream, forked so that training's own stream is
untouched. Logged as:

* `eval/reward`: the run's own reward (`--reward_funcs`: the proxy reward model by default; DPO: the proxy);
* `eval/proxy`: the proxy reward model (final_reward_model/);
* `eval/gold`: the held-out gold reward model, where final_gold_reward_model/ exists;
* `eval/oracle`: on the tiny data, the oracle's share of real answers (`assets/tiny_oracle.py`);
* each with its standard error over the prompts (`eval/<judge>_se`);
* `eval/sample_kl`: the KL to the reference, summed over each reply's tokens, averaged over the replies;
* `eval/distinct_share` and `eval/length` (reply tokens, its EOS included).

`overoptimization(history, window)` is the alarm: at an evaluation where, against the one `window` evaluations
back, the proxy rose by more than its noise while the gold score or the oracle share fell by more than theirs (the
noise of a difference: the two standard errors added in quadrature), it returns the numbers, which the scripts
print in one line and record in metrics.jsonl (`alarm/overoptimization` = 1, `alarm/<judge>_drop`); with
`--stop_on_overoptimization` the run ends there. `Best` keeps the best evaluation by `--select_by` and a CPU copy
of its weights, written as NAME_best/ at the end.
"""

import math
from pathlib import Path

import torch
from accelerate.utils import gather_object

from common import (
    generate_responses,
    get_reward,
    load_causal_lm,
    load_oracle,
    load_reward_model,
    save_pretrained_atomic,
    sequence_kl,
    unwrap,
)
from lifecycle import GOLD_REWARD_MODEL_DIR, SELECT_KEYS, atomic_write_json, check

JUDGES = ("proxy", "gold", "oracle")
ALARM_JUDGES = ("gold", "oracle")  # the scores an over-optimised proxy betrays itself against


def validation_prompts(data, n):
    """The first `n` prompts of the validation split (itself a seeded split): the same for PPO, GRPO and DPO."""
    return list(data["validation"]["prompt"])[:n]


def check_live_eval_args(args):
    """The flags' one-line errors (before any model loads)."""
    check(args.eval_every >= 0, f"--eval_every must be >= 0 (0 = no held-out evaluation), got {args.eval_every}")
    check(args.eval_prompts >= 1 and args.eval_batch_size >= 1, "--eval_prompts and --eval_batch_size must be >= 1")
    check(args.alarm_window >= 1, f"--alarm_window must be >= 1, got {args.alarm_window}")
    check(
        args.eval_every or (args.select_by == "proxy" and not args.stop_on_overoptimization),
        "--select_by gold|oracle and --stop_on_overoptimization need held-out evaluations: set --eval_every",
    )


class LiveEval:
    """The held-out judges of one run. `proxy` is the (model, tokenizer) the run already holds; `reward` the run's
    own reward (a `common.RewardMix`, PPO and GRPO) or None (DPO: the proxy is its reward)."""

    def __init__(self, args, data, tokenizer, reference, proxy, device, reward=None, rank=0, world=1):
        self.args, self.tokenizer, self.reference, self.reward = args, tokenizer, reference, reward
        self.rank, self.world = rank, world
        self.prompts = validation_prompts(data, args.eval_prompts)
        check(len(self.prompts) >= world, f"--eval_prompts: {len(self.prompts)} prompts for {world} processes")
        self.proxy = proxy
        has_gold = (Path(args.work_dir) / GOLD_REWARD_MODEL_DIR / "config.json").is_file()
        held = reward.models.get("gold") if reward else None  # --reward_funcs gold: the run's own, not a second copy
        self.gold = held or (load_reward_model(args.work_dir, device, args, gold=True) if has_gold else None)
        self.oracle = load_oracle(args.work_dir)
        check(
            args.select_by != "gold" or self.gold is not None,
            f"--select_by gold: {Path(args.work_dir) / GOLD_REWARD_MODEL_DIR} not found (run_pipeline.sh's gold stage "
            "trains it first)",
        )
        check(
            args.select_by != "oracle" or self.oracle is not None,
            "--select_by oracle: the oracle knows the tiny data only",
        )

    def judges(self):
        """The judges this run has, in words: "proxy, gold, oracle"."""
        return ", ".join(j for j in JUDGES if j == "proxy" or getattr(self, j) is not None)

    def sample(self, policy):
        """This process's share of the prompts, one reply each from the fixed stream: per-reply lists of
        {"reward", "proxy", "gold", "oracle", "sample_kl", "length"} and the replies."""
        args, prompts = self.args, self.prompts[self.rank :: self.world]
        out = {key: [] for key in ("reward", "proxy", "gold", "oracle", "sample_kl", "length")}
        replies, tokens = [], 0
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(args.seed + self.rank)
            for i in range(0, len(prompts), args.eval_batch_size):
                samples = generate_responses(
                    policy, self.tokenizer, prompts[i : i + args.eval_batch_size], args.max_prompt_length,
                    args.max_new_tokens, args.temperature, args.top_p,
                    compile=getattr(args, "compile_generation", False),
                )  # fmt: skip
                proxy = get_reward(*self.proxy, samples.prompts, samples.responses, args.reward_max_length)
                out["proxy"] += proxy.tolist()
                out["reward"] += (self.reward(samples, self.tokenizer)[0] if self.reward else proxy).tolist()
                if self.gold is not None:
                    out["gold"] += get_reward(
                        *self.gold, samples.prompts, samples.responses, args.reward_max_length
                    ).tolist()
                if self.oracle is not None:
                    out["oracle"] += [
                        float(self.oracle.judge(p, r) == "good") for p, r in zip(samples.prompts, samples.responses)
                    ]
                out["sample_kl"] += sequence_kl(policy, self.reference, samples, args.temperature).tolist()
                out["length"] += samples.response_mask.sum(1).tolist()
                replies += samples.responses
                tokens += int(samples.attention_mask.sum())
        return out, replies, tokens

    def __call__(self, policy):
        """The held-out metrics (identical on every process: each samples its share, then all gather), the replies
        with their run's reward (for a look at a few) and the tokens generated (prompts included)."""
        out, replies, tokens = self.sample(unwrap(policy))
        if self.world > 1:
            out = {key: sum(gather_object([values]), []) for key, values in out.items()}
            replies, tokens = sum(gather_object([replies]), []), sum(gather_object([tokens]))
        metrics = {}
        for key in ("reward", *JUDGES):
            if out[key]:
                values = torch.tensor(out[key], dtype=torch.float64)
                metrics[f"eval/{key}"] = values.mean().item()
                metrics[f"eval/{key}_se"] = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else 0.0
        metrics["eval/sample_kl"] = sum(out["sample_kl"]) / len(out["sample_kl"])
        metrics["eval/distinct_share"] = len(set(replies)) / len(replies)
        metrics["eval/length"] = sum(out["length"]) / len(out["length"])
        return metrics, list(zip(out["reward"], replies)), tokens


def overoptimization(history, window):
    """The alarm over `history` (the run's evaluations so far, oldest first, each a dict with "step" and the
    `eval/...` metrics): where the latest, against the one `window` evaluations back, shows the proxy up by more than
    the noise of the difference and the gold score or the oracle share down by more than theirs. Returns
    {"step", "since", "proxy": (then, now), judge: (then, now), ...} naming each falling judge, or None."""
    if len(history) <= window:
        return None
    then, now = history[-1 - window], history[-1]

    def moved(key):  # the change and its noise (the standard errors in quadrature)
        if key not in then or key not in now:
            return None
        noise = math.hypot(then.get(f"{key}_se", 0.0), now.get(f"{key}_se", 0.0))
        return now[key] - then[key], noise

    proxy = moved("eval/proxy")
    if proxy is None or proxy[0] <= proxy[1]:
        return None
    fallen = {}
    for judge in ALARM_JUDGES:
        change = moved(f"eval/{judge}")
        if change is not None and -change[0] > change[1]:
            fallen[judge] = (then[f"eval/{judge}"], now[f"eval/{judge}"])
    if not fallen:
        return None
    return {"step": now["step"], "since": then["step"], "proxy": (then["eval/proxy"], now["eval/proxy"]), **fallen}


def alarm_line(alarm):
    """The alarm in one line, with its numbers."""
    parts = [f"proxy {alarm['proxy'][0]:+.3f} -> {alarm['proxy'][1]:+.3f}"]
    parts += [f"{judge} {alarm[judge][0]:.3f} -> {alarm[judge][1]:.3f}" for judge in ALARM_JUDGES if judge in alarm]
    return (
        f"over-optimisation alarm at step {alarm['step']}: since step {alarm['since']} the proxy rose while the "
        f"{' and '.join(j for j in ALARM_JUDGES if j in alarm)} fell, each beyond its noise ({', '.join(parts)})"
    )


def alarm_metrics(alarm):
    """The alarm's record in metrics.jsonl: a flag and each falling judge's drop."""
    record = {"alarm/overoptimization": 1.0, "alarm/proxy_rise": alarm["proxy"][1] - alarm["proxy"][0]}
    return record | {f"alarm/{j}_drop": alarm[j][0] - alarm[j][1] for j in ALARM_JUDGES if j in alarm}


class Best:
    """The best held-out evaluation by `--select_by` so far, with a CPU copy of its weights (its `state`)."""

    def __init__(self, select_by, saved=None):
        self.select_by, self.key = select_by, SELECT_KEYS[select_by]
        self.saved = saved  # {"step", "value", "state", "select_by"} from a checkpoint, or None

    def update(self, step, metrics, model):
        """Keep this evaluation if it beats the best so far (the first one always). Returns whether it did."""
        value = metrics[self.key]
        if self.saved is not None and value <= self.saved["value"]:
            return False
        state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
        self.saved = {"step": step, "value": value, "state": state, "select_by": self.select_by}
        return True

    def line(self, work_dir, folder):
        """Where the best went, in one line."""
        return f"best held-out {self.select_by} {self.saved['value']:.4f} at step {self.saved['step']} -> {work_dir}/{folder}"

    def info(self, prompts):
        """best.json: the step, the score that picked it and its value, on how many validation prompts."""
        return {
            "step": self.saved["step"],
            "select_by": self.select_by,
            self.key: self.saved["value"],
            "eval_prompts": prompts,
        }


class Monitor:
    """What a training loop calls at each held-out evaluation: the `LiveEval`, its history, the alarm and the `Best`
    checkpoint. `saved` is `state()` from the run's checkpoint (a --resume), else None. After a call, `stop` says
    whether the run ends here (the alarm fired under --stop_on_overoptimization)."""

    def __init__(self, live, args, saved=None):
        self.live, self.args = live, args
        saved = saved or {}
        best = saved.get("best")
        check(
            best is None or best["select_by"] == args.select_by,
            f"--select_by {args.select_by}: the run being resumed picks its best checkpoint by {best and best['select_by']}; "
            f"resume with --select_by {best and best['select_by']}",
        )
        self.best = Best(args.select_by, best)
        self.history = saved.get("history", [])  # the evaluations so far: {"step", "eval/...": ...}
        self.stopped = saved.get("stopped")  # the step the alarm ended the run at, or None
        self.stop, self.tokens = False, 0

    def __call__(self, step, policy, say=print):
        """Evaluate at `step`: the metrics to log (with the alarm's when it fires); keeps the best checkpoint."""
        metrics, scored, tokens = self.live(policy)
        judges = 1 + (self.live.gold is not None) + 2  # the proxy, the gold, the KL's two forward passes
        self.tokens = tokens * (1 + judges)  # generation, then each pass over the same tokens
        self.history.append({"step": step, **metrics})
        self.best.update(step, metrics, policy)
        parts = [f"{j} {metrics[f'eval/{j}']:+.3f}" for j in JUDGES if f"eval/{j}" in metrics]
        say(
            f"step {step} | held out ({len(self.live.prompts)} prompts): {', '.join(parts)}, KL {metrics['eval/sample_kl']:.2f}"
        )
        for score, reply in scored[:2]:
            say(f"    a reply scored {score:+.2f}: {reply[:100]!r}")
        alarm = overoptimization(self.history, self.args.alarm_window)
        if alarm:
            say(
                alarm_line(alarm)
                + ("; stopping (--stop_on_overoptimization)" if self.args.stop_on_overoptimization else "")
            )
            metrics |= alarm_metrics(alarm)
            if self.args.stop_on_overoptimization:
                self.stop, self.stopped = True, step
        return metrics

    def state(self):
        """What a checkpoint keeps, for a --resume to go on as the uninterrupted run would."""
        return {"best": self.best.saved, "history": self.history, "stopped": self.stopped}

    def finished_line(self):
        """A resumed run the alarm had stopped: one line saying it is finished."""
        return f"the run stopped at step {self.stopped} on the over-optimisation alarm (--stop_on_overoptimization): finished"

    def best_policy(self, start, tokenizer):
        """The best checkpoint's policy, loaded into a fresh copy of the start model."""
        policy = load_causal_lm(start, tokenizer)
        policy.load_state_dict(self.best.saved["state"])
        return policy


def save_best(monitor, folder, start, tokenizer, method, files, card):
    """NAME_best/: the best held-out checkpoint by --select_by, loaded into a copy of the `start` model, with
    best.json (its step and the score that picked it), eval_results.json (the held-out evaluation at that step), the
    run's `files` ({name: writer}: metrics, curves, args) and its model card (`card(results, title)`)."""
    best = monitor.best
    record = next(r for r in monitor.history if r["step"] == best.saved["step"])
    results = {"split": "validation", "prompts": len(monitor.live.prompts), "step": best.saved["step"]}
    results |= {k: v for k, v in record.items() if k.startswith("eval/")}
    title = f"{method} policy, best step {best.saved['step']} by held-out {best.select_by}"
    extra = files | {
        "best.json": lambda path: atomic_write_json(path, best.info(len(monitor.live.prompts))),
        "eval_results.json": lambda path: atomic_write_json(path, results),
        "README.md": card(results, title),
    }
    save_pretrained_atomic(folder, monitor.best_policy(start, tokenizer), tokenizer, extra=extra)
    print(best.line(folder.parent, folder.name))
