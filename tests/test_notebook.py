"""judge.py against a local OpenAI-compatible server, and analysis_notebook.ipynb executed headless.

The server (http.server in a thread on 127.0.0.1) implements POST /v1/chat/completions;
the judge talks to it through the real `openai` client. It answers "A" when reply A is
at least as long as reply B, else "B" (the model "fake-position" always answers "A"),
unless the test queued a status code (429, 500, 401) or a literal answer for the next request.
"""

import json
import math
import shutil
import subprocess
import time

import nbformat
import numpy as np
import openai
import pandas as pd
import pytest
from conftest import REPO, SCRIPT_ENV, JsonHandler, run_script, serve
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import judge
from judge import Judge, pair_outcome, wilson_interval, win_rates
from lifecycle import DPO_DIR, PPO_DIR, PROCESSED_DIR, REWARD_MODEL_DIR

API_KEY = "sk-test-do-not-leak-7f3a9c"


class FakeOpenAI:
    def __init__(self):
        self.queue, self.requests = [], []  # queued actions; (time, Authorization header, request body)
        fake = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((time.monotonic(), self.headers.get("Authorization"), body))
                action = fake.queue.pop(0) if fake.queue else None
                if self.path != "/v1/chat/completions":
                    self.reply(404, {"error": {"message": f"no route {self.path}"}})
                elif isinstance(action, int):
                    self.reply(action, {"error": {"message": f"scripted {action}", "type": "test", "code": action}})
                else:
                    answer = action if isinstance(action, str) else fake.answer(body)
                    message = {"role": "assistant", "content": answer}
                    choice = {"index": 0, "message": message, "finish_reason": "stop"}
                    usage = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
                    self.reply(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                     "choices": [choice], "usage": usage})  # fmt: skip

        self.server, self.url = serve(Handler)

    @staticmethod
    def answer(body):
        if body["model"] == "fake-position":  # a judge with nothing but position bias
            return "A"
        text = body["messages"][1]["content"]
        reply_a = text.split("[Reply A]\n", 1)[1].split("\n\n[Reply B]\n", 1)[0]
        reply_b = text.split("\n\n[Reply B]\n", 1)[1].rsplit("\n\nBetter reply", 1)[0]
        return "A" if len(reply_a) >= len(reply_b) else "B"


@pytest.fixture
def server(monkeypatch):
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    yield fake
    fake.server.shutdown()


# --- pure helpers ---------------------------------------------------------------------------


def test_wilson_interval_against_hand_values():
    # k=8, n=10: p=0.8, z^2=3.8416 -> centre 0.71674, half-width 0.22657
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.49016, abs=1e-4), pytest.approx(0.94331, abs=1e-4))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_both_orders_combine_into_win_tie_loss():
    # policy_first: the policy is reply A; base_first: the policy is reply B
    assert pair_outcome("A", "B") == "win"
    assert pair_outcome("B", "A") == "loss"
    assert pair_outcome("A", "A") == pair_outcome("B", "B") == "tie"  # position bias cancels to a tie
    assert pair_outcome("invalid", "B") == pair_outcome("A", "invalid") == "invalid"


def test_win_rates_leave_invalid_out():
    rates = win_rates(["win", "win", "tie", "loss", "invalid"])
    assert rates["n"] == 4 and rates["invalid"] == 1
    assert rates["win"] == (0.5, *wilson_interval(2, 4))
    assert rates["tie"][0] == rates["loss"][0] == 0.25


# --- the judge against the local server -----------------------------------------------------


def test_invalid_answers_are_retried_then_recorded_as_invalid(server, tmp_path):
    cache = tmp_path / "cache.json"
    j = Judge(cache_path=cache, invalid_retries=2)
    server.queue = ["I think A", "A"]
    assert j.judge("p", "long reply", "short", "policy_first") == "A"
    assert len(server.requests) == 2 and server.requests[0][2] == server.requests[1][2]  # the same question again
    server.queue = ["maybe", "C", "a"]
    assert j.judge("p2", "x", "y", "policy_first") == "invalid"
    assert len(server.requests) == 5
    saved = json.loads(cache.read_text())
    assert sorted(v["answer"] for v in saved.values()) == ["A", "invalid"]
    # a new judge on the same cache asks nothing for the valid answer, and the invalid one again
    again = Judge(cache_path=cache)
    assert again.judge("p", "long reply", "short", "policy_first") == "A" and again.requests == 0
    assert again.judge("p2", "x", "y", "policy_first") == "A" and again.requests == 1
    assert len(server.requests) == 6
    assert sorted(v["answer"] for v in json.loads(cache.read_text()).values()) == ["A", "A"]


def test_rate_limits_and_server_errors_back_off_exponentially(server, tmp_path, delays):
    j = Judge(cache_path=tmp_path / "c.json", base_delay=0.5)
    server.queue = [429, 429, 500, 503]
    assert j.judge("p", "a", "bb", "policy_first") == "B"
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert len(server.requests) == 5
    assert all(auth == f"Bearer {API_KEY}" for _, auth, _ in server.requests)  # the key from the environment
    body = server.requests[-1][2]
    assert body["model"] == judge.DEFAULT_MODEL and body["messages"][0]["content"] == judge.SYSTEM_PROMPT
    assert (body["temperature"], body["max_tokens"]) == (0, 1)


def test_gives_up_after_the_last_retry_and_does_not_retry_other_errors(server, tmp_path, delays):
    j = Judge(cache_path=tmp_path / "c.json", api_retries=2, base_delay=0.1)
    server.queue = [429, 429, 429]
    with pytest.raises(RuntimeError, match="judge: giving up after 3 attempts \\(RateLimitError\\)"):
        j.judge("p", "a", "b", "policy_first")
    server.queue = [401]
    with pytest.raises(openai.AuthenticationError):
        j.judge("p", "a", "b", "policy_first")
    assert len(server.requests) == 4 and delays == [0.1, 0.2]
    assert not (tmp_path / "c.json").exists()  # failures are not cached


def test_compare_asks_both_orders_and_caches_without_the_key(server, tmp_path):
    cache = tmp_path / "gpt4_judgements.json"
    j = Judge(model="judge-model", cache_path=cache)
    assert j.compare("prompt", "a longer reply", "short") == "win"  # A first, then B: both prefer the policy
    assert j.compare("prompt", "same", "same") == "tie"  # identical replies: a tie, asked of no one
    assert j.compare("prompt", "s", "a much longer base reply") == "loss"
    first, second = (r[2]["messages"][1]["content"] for r in server.requests[:2])
    assert first.index("a longer reply") < first.index("short") and second.index("short") < second.index("a longer")
    assert j.requests == 4 and len(json.loads(cache.read_text())) == 4
    assert API_KEY not in cache.read_text() and not list(tmp_path.glob(".*tmp*"))


# --- the notebook, headless ---------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_outputs(tiny_reward_dir, tmp_path_factory):
    """A work dir with tiny evaluation outputs: PPO = a copy of base (all ties), DPO = a perturbed copy."""
    import torch
    from transformers import AutoModelForCausalLM

    from common import load_tokenizer
    from lifecycle import TINY_MODEL_DIR

    work = tmp_path_factory.mktemp("notebook_work")
    for name in (PROCESSED_DIR, REWARD_MODEL_DIR):
        (work / name).symlink_to(tiny_reward_dir / name)
    shutil.copytree(TINY_MODEL_DIR, work / PPO_DIR)
    dpo = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in dpo.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dpo.save_pretrained(work / DPO_DIR)
    load_tokenizer(TINY_MODEL_DIR).save_pretrained(work / DPO_DIR)
    record = {"step": 3, "time/elapsed_s": 42.0, "tokens/processed": 12345, "mem/peak_mb": 321.0}
    (work / DPO_DIR / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    run_script("evaluate_models.py", "--preset", "tiny", "--work_dir", work, "--num_prompts", 12)
    return work


def execute_notebook(work, monkeypatch, **env):
    monkeypatch.setenv("RLHF_WORK_DIR", str(work))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(REPO / "analysis_notebook.ipynb", as_version=4)
    # a kernel on a busy machine (two test workers and the pipeline beside it) may start slower than the 60 s default
    NotebookClient(
        nb, timeout=300, startup_timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    nbformat.write(nb, work / "analysis_notebook.executed.ipynb")
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_without_an_evaluation_names_the_command_for_the_runs_preset_and_model(tmp_path, monkeypatch):
    work = tmp_path / "w"
    (work / PPO_DIR).mkdir(parents=True)
    saved = {"preset": "gpt2", "model": "gpt2-medium", "work_dir": "elsewhere"}  # as PPO_training.py saved it
    (work / PPO_DIR / "args.json").write_text(json.dumps(saved))
    with pytest.raises(CellExecutionError) as error:
        execute_notebook(work, monkeypatch)
    assert f"{work / 'rlhf_eval_results_with_base.xlsx'} not found" in str(error.value)
    assert f"`python evaluate_models.py --preset gpt2 --work_dir {work} --model gpt2-medium`" in str(error.value)


@pytest.mark.slow
def test_the_runner_executes_the_notebook_into_the_work_dir(eval_outputs, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(eval_outputs, work, symlinks=True)
    env = {k: v for k, v in SCRIPT_ENV.items() if k not in ("OPENAI_API_KEY", "RLHF_WORK_DIR")}
    proc = subprocess.run(
        ["bash", str(REPO / "run_pipeline.sh"), "--preset", "tiny", "--work_dir", str(work), "--only", "notebook",
         "--notebook.ExecutePreprocessor.startup_timeout=300"],  # a busy machine may start a kernel slowly
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Kernel is running over TCP" not in proc.stdout + proc.stderr
    executed = nbformat.read(work / "analysis_notebook.ipynb", as_version=4)
    text = "\n".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "policies evaluated: ppo, dpo" in text and "the LLM-judge section is skipped" in text
    assert (work / "analysis_frontier.png").stat().st_size > 5000


@pytest.mark.slow
def test_notebook_without_api_key_skips_the_judge(eval_outputs, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(eval_outputs, work, symlinks=True)
    assert (work / "rlhf_eval_frontier.csv").is_file()  # the evaluation wrote one; the section reads this one:
    # along PPO's path the proxy keeps rising while the oracle falls past step 10 (they part ways); along
    # DPO's the oracle rises to the end; best-of-N peaks at N = 2 on both
    (work / "rlhf_eval_frontier.csv").unlink()
    pd.DataFrame(
        [
            ("base", 0, None, 0.0, 0.5, 0.4, 0.6, 0.60, 0.55, 0.65),
            ("ppo", 10, None, 1.0, 1.0, 0.9, 1.1, 0.80, 0.75, 0.85),
            ("ppo", 20, None, 4.0, 1.5, 1.4, 1.6, 0.50, 0.45, 0.55),
            ("dpo", 10, None, 1.0, 1.0, 0.9, 1.1, 0.70, 0.65, 0.75),
            ("dpo", 20, None, 2.0, 1.2, 1.1, 1.3, 0.72, 0.67, 0.77),
            ("best_of_n", None, 1, 0.0, 0.5, 0.4, 0.6, 0.60, 0.55, 0.65),
            ("best_of_n", None, 2, 0.19, 0.9, 0.8, 1.0, 0.70, 0.65, 0.75),
        ],
        columns=["method", "step", "n", "kl", "proxy_mean", "proxy_ci_low", "proxy_ci_high", "oracle_good",
                 "oracle_good_ci_low", "oracle_good_ci_high"],
    ).assign(sqrt_kl=lambda f: f.kl**0.5, distinct_share=1.0, length_mean=30.0).to_csv(
        work / "rlhf_eval_frontier.csv", index=False
    )  # fmt: skip
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    text = execute_notebook(work, monkeypatch)
    assert "OPENAI_API_KEY is not set: the LLM-judge section is skipped" in text
    assert "policies evaluated: ppo, dpo" in text
    assert "ppo: is not distinguishable from base by the reward model (gain +0.000" in text
    assert (
        "ppo: the proxy peaks at step 20 (KL 4.00); the oracle at step 10 (KL 1.00), then falls to 0.50 while the "
        "proxy holds or rises: proxy and oracle part ways." in text
    )
    assert "dpo: the proxy peaks at step 20 (KL 2.00); the oracle at step 20 (KL 2.00)." in text
    assert "best-of-n: the proxy peaks at N = 2 (KL 0.19); the oracle at N = 2 (KL 0.19)." in text
    for name in ("reward_distributions", "reward_vs_kl", "cost_vs_quality", "frontier"):
        assert (work / f"analysis_{name}.png").stat().st_size > 5000
    assert not (work / "gpt4_judgements.json").exists()


def test_a_reply_starting_with_equals_survives_the_xlsx_round_trip(tmp_path):
    from evaluate_models import write_xlsx

    # openpyxl takes a string starting with "=" for a formula, which reads back empty (nothing computed it)
    texts = ["=1+1", "=SUM(A1:A3) adds them up", "=", "+3", "-minus", "@at", "plain", "=\x07"]
    table = pd.DataFrame({"prompt": texts, "base_response": texts[::-1], "base_reward": range(len(texts))})
    write_xlsx(tmp_path / "r.xlsx", table, pd.DataFrame({"model": ["base"], "note": ["=base"]}))
    back = pd.read_excel(tmp_path / "r.xlsx", sheet_name="results", keep_default_na=False)
    escaped = [t.replace("\x07", "\\x07") for t in texts]  # the xlsx shows control characters escaped
    assert back["prompt"].tolist() == escaped and back["base_response"].tolist() == escaped[::-1]
    assert pd.read_excel(tmp_path / "r.xlsx", sheet_name="summary")["note"].tolist() == ["=base"]


@pytest.mark.slow
def test_notebook_with_two_local_judges(eval_outputs, tmp_path, monkeypatch, server):
    work = tmp_path / "w"
    shutil.copytree(eval_outputs, work, symlinks=True)
    # the judge reads the JSONL's text: one DPO reply the xlsx would have lost (a formula) and escaped (a bell)
    jsonl = work / "rlhf_eval_responses.jsonl"
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    records[0]["dpo_response"] = "=1+1 is two \x07"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    server.queue = [429, "Neither"]  # the first request is rate limited, the second answer is invalid
    env = {"RLHF_JUDGE_MODELS": "fake-gpt,fake-position", "RLHF_JUDGE_BASE_DELAY": "0.2"}
    text = execute_notebook(work, monkeypatch, **env)
    # a (prompt, policy reply, base reply) seen before (DPO may repeat PPO's reply) is asked once, and a policy
    # reply identical to base's is a tie asked of no one
    every = {(r["prompt"], r[f"{p}_response"], r["base_response"]) for r in records for p in ("ppo", "dpo")}
    pairs = len({(prompt, reply, base) for prompt, reply, base in every if reply != base})
    identical = {p: sum(r[f"{p}_response"] == r["base_response"] for r in records) for p in ("ppo", "dpo")}
    assert pairs >= 8 and sum(identical.values()) >= 1, (pairs, identical)  # both kinds of pair are here
    table = pd.read_csv(work / "judge_win_rates.csv").set_index(["judge", "policy"])
    for p in ("ppo", "dpo"):
        assert (table.xs(p, level="policy")["identical"] == identical[p]).all(), (p, identical)
    # each new judgement once, plus the 429's retry and the invalid answer's second asking
    assert f"judge fake-gpt: 12 prompts x 2 pairs of models x 2 orders; {2 * pairs + 2} API requests made" in text
    assert f"judge fake-position: 12 prompts x 2 pairs of models x 2 orders; {2 * pairs} API requests made" in text
    (t0, _, limited), *rest = server.requests
    assert any(body == limited and t - t0 >= 0.2 for t, _, body in rest)  # asked again after the backoff
    assert any("\n=1+1 is two \x07\n" in body["messages"][1]["content"] for _, _, body in server.requests)
    saved = json.loads((work / "gpt4_judgements.json").read_text())
    assert len(saved) == 4 * pairs and {v["answer"] for v in saved.values()} == {"A", "B"}  # "Neither" asked again

    rates = pd.read_csv(work / "judge_win_rates.csv").set_index(["judge", "policy"])
    assert rates.loc[("fake-gpt", "ppo"), "tie_rate"] == 1.0  # identical replies: each order picks A, all ties
    assert rates.loc[("fake-position", "dpo"), "tie_rate"] == 1.0  # always A: position bias, cancelled to ties
    # fake-gpt prefers the longer reply (in characters of the JSONL's text): its rates follow from the lengths
    diffs = [len(r["dpo_response"]) - len(r["base_response"]) for r in records]
    outcomes = ["win" if d > 0 else "tie" if d == 0 else "loss" for d in diffs]
    expected = judge.length_controlled_win_rate(outcomes, diffs, seed=0)
    dpo = rates.loc[("fake-gpt", "dpo")]
    assert dpo["win_rate"] == pytest.approx(outcomes.count("win") / 12) and 0 < dpo["win_rate"] < 1
    np.testing.assert_allclose(dpo[["lc_win_rate", "lc_win_ci_low", "lc_win_ci_high"]].to_numpy(float), expected)
    assert math.isnan(dpo["lc_win_rate"])  # length alone decides: no rate at equal length to be had
    assert rates.loc[("fake-gpt", "ppo"), "lc_win_rate"] == 0.0  # no wins at any length
    agree = pd.read_csv(work / "judge_agreement.csv").set_index("policy")
    assert agree.loc["ppo", "agreement"] == 1.0 and math.isnan(agree.loc["ppo", "kappa"])  # both: all ties
    assert agree.loc["dpo", "agreement"] == pytest.approx(outcomes.count("tie") / 12)
    assert agree.loc["dpo", "kappa"] == pytest.approx(
        0.0, abs=1e-12
    )  # a judge that always says tie agrees no more than chance
    assert (work / "judge_win_rates.png").stat().st_size > 5000
    assert "; judge fake-gpt against base: wins " in text and "; judge fake-position against base: wins 0% [" in text

    # a rerun takes every judgement from the cache: no request at all
    served = len(server.requests)
    text = execute_notebook(work, monkeypatch, **env)
    assert text.count(" 0 API requests made") == 2 and len(server.requests) == served

    # with an SFT model in the evaluation, it is judged against base and each RL policy against it too
    from evaluate_models import write_xlsx

    xlsx = work / "rlhf_eval_results_with_base.xlsx"
    sheets = pd.read_excel(xlsx, sheet_name=None, keep_default_na=False)
    sft_replies = [r["base_response"] + " Enjoy." for r in records]  # longer than base's: fake-gpt prefers it
    sheets["results"] = sheets["results"].assign(
        sft_response=sft_replies, sft_reward=sheets["results"].base_reward, sft_kl=0.5, sft_kl_ref=0.5
    )
    summary = sheets["summary"]
    sheets["summary"] = pd.concat([summary, summary[summary.model == "base"].assign(model="sft")], ignore_index=True)
    (work / "judge_win_rates.csv").unlink()
    write_xlsx(xlsx, sheets["results"], sheets["summary"])
    jsonl.write_text(
        "".join(json.dumps(r | {"sft_response": reply}) + "\n" for r, reply in zip(records, sft_replies)), "utf-8"
    )
    text = execute_notebook(work, monkeypatch, RLHF_JUDGE_MODELS="fake-gpt")
    rates = pd.read_csv(work / "judge_win_rates.csv").set_index(["judge", "policy", "against"])
    assert sorted(rates.index) == sorted(
        [("fake-gpt", p, o) for p, o in [("sft", "base"), ("ppo", "base"), ("ppo", "sft"), ("dpo", "base"),
                                         ("dpo", "sft")]]
    )  # fmt: skip
    assert rates.loc[("fake-gpt", "sft", "base"), "win_rate"] == 1.0  # always the longer reply
    assert rates.loc[("fake-gpt", "ppo", "sft"), "loss_rate"] == 1.0  # PPO's replies are base's here: shorter
    assert "policies evaluated: sft, ppo, dpo" in text and "; judge fake-gpt against sft: wins 0% [" in text

    # the key went to the server only: no file in the work dir holds it
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert API_KEY.encode() not in path.read_bytes(), path
