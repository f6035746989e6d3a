"""Tracking and sharing: --report_to's trackers read back against metrics.jsonl, every model folder's card,
and --push_to_hub up to the upload (the Hub cannot be reached from here)."""

import glob
import importlib.util
import json
import os
import shutil
import struct
import sys

import pandas as pd
import pytest
from conftest import SCRIPT_ENV, JsonHandler, assert_same_as_metrics, run_script, serve, tensorboard_scalars
from huggingface_hub import ModelCard

import common
import lifecycle
import reporting
from lifecycle import (
    DPO_DIR,
    GOLD_REWARD_MODEL_DIR,
    GRPO_BEST_DIR,
    GRPO_FINAL_DIR,
    PPO_DIR,
    PROCESSED_DIR,
    REWARD_MODEL_DIR,
    SFT_DIR,
    UserError,
    parse_args,
)

COST_KEYS = ("time/elapsed_s", "tokens/processed", "mem/peak_mb")  # ours, beside Trainer's logs
DPO_QUICK = ["--preset", "tiny", "--max_train_samples", 32, "--max_eval_samples", 8, "--eval_every", 0]
DPO_QUICK += ["--per_device_train_batch_size", 4, "--max_steps", 4, "--eval_steps", 2, "--logging_steps", 1]


def test_every_training_run_logs_metrics_jsonl_to_tensorboard(tiny_reward_dir, tiny_pipeline):
    runs = {"reward_model": tiny_reward_dir / "runs" / "reward_model"}
    runs |= {name: tiny_pipeline / "runs" / name for name in ("gold_reward_model", "sft", "ppo", "grpo", "dpo")}
    for name, run_dir in runs.items():
        records = reporting.read_metrics(run_dir / "metrics.jsonl")
        scalars = tensorboard_scalars(run_dir / lifecycle.TENSORBOARD_DIR)
        # the reward model logs through Trainer's TensorBoard callback: its logs, without our cost counters
        assert_same_as_metrics(scalars, records, skip=COST_KEYS if "reward_model" in name else ())
        assert len(records) >= 3 and len(scalars) >= 8, (name, len(records), sorted(scalars))
    hparams = glob.glob(str(tiny_pipeline / "runs" / "ppo" / lifecycle.TENSORBOARD_DIR / "*" / "hparams.yml"))
    total_steps = json.loads((tiny_pipeline / PPO_DIR / "args.json").read_text())["total_steps"]
    assert len(hparams) == 1 and f"total_steps: {total_steps}\n" in open(hparams[0]).read()  # settings: its config


def test_a_resumed_run_replaces_what_the_killed_run_logged_past_its_checkpoint(work):
    """A run that logged step 3 and died before its checkpoint (made here with another seed, so its step 3 differs):
    resumed from step 2, TensorBoard shows the resumed run's step 3, which is metrics.jsonl's."""
    import PPO_training as ppo

    def args(steps, seed, *resume):
        argv = ["--preset", "tiny", "--work_dir", str(work), "--rollout_batch_size", "4", "--num_minibatches", "2"]
        argv += ["--max_new_tokens", "12", "--test_prompts", "0", "--save_every", "2", "--report_to", "tensorboard"]
        argv += ["--eval_every", "0"]
        return parse_args(ppo.Args, ppo.TINY, [*argv, "--total_steps", str(steps), "--seed", str(seed), *resume])

    run_dir = work / "runs" / "ppo"
    ppo.main(args(2, 42))
    at_step_2 = (run_dir / "checkpoint.pt").read_bytes()
    ppo.main(args(3, 7, "--resume"))  # the step 3 that is lost
    lost = tensorboard_scalars(run_dir / lifecycle.TENSORBOARD_DIR)
    (run_dir / "checkpoint.pt").write_bytes(at_step_2)  # as if killed before step 3's checkpoint
    ppo.main(args(3, 42, "--resume"))
    scalars = tensorboard_scalars(run_dir / lifecycle.TENSORBOARD_DIR)
    records = reporting.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and sorted(scalars["objective/kl"]) == [1, 2, 3]
    assert_same_as_metrics(scalars, records)
    assert lost["objective/scores"][3] != scalars["objective/scores"][3]  # the lost step 3 is gone
    assert lost["objective/scores"][2] == scalars["objective/scores"][2]
    assert len(glob.glob(str(run_dir / lifecycle.TENSORBOARD_DIR / "events.out.tfevents.*"))) == 3  # one per run


def wandb_records(path):
    """The records of a wandb run file (run-ID.wandb): a 7-byte header, then LevelDB-log blocks of 32 KiB, each
    record a 7-byte header (crc, length, type: 1 whole, 2 first, 3 middle, 4 last) and a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = open(path, "rb").read(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


@pytest.mark.slow
def test_a_run_with_wandb_offline_and_a_refused_upload(tiny_data_dir, tmp_path, fake_hub):
    """One DPO run: wandb's offline file holds metrics.jsonl and the settings; then the Hub refuses the upload,
    after the save, in one line."""
    pytest.importorskip("wandb")  # requirements-dev.txt installs it
    work = tmp_path / "work"
    work.mkdir()
    (work / PROCESSED_DIR).symlink_to(tiny_data_dir / PROCESSED_DIR)
    env = {k: v for k, v in SCRIPT_ENV.items() if k != "HF_HUB_OFFLINE"} | {
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": "",
    }
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_not_a_real_token"}
    argv = [*DPO_QUICK, "--work_dir", work, "--report_to", "wandb,tensorboard", "--push_to_hub", "someone/tiny-dpo"]
    proc = run_script("DPO_training.py", *argv, check=False, env=env)

    # wandb, offline
    run_id = json.loads((work / "runs" / "dpo" / reporting.TRACKER_RUN_FILE).read_text())["id"]
    (path,) = glob.glob(str(work / "runs" / "dpo" / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    history, config, runs = [], {}, []

    def key(item):  # a key is `key` or `nested_key`, by wandb version
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {key(item): json.loads(item.value_json) for item in record.history.item}
            history.append(row | {"_step": record.history.step.num})
        elif kind == "config":
            config |= {key(item): json.loads(item.value_json) for item in record.config.update}
        elif kind == "run":
            runs.append(record.run)
    assert [(r.project, r.display_name, r.run_id) for r in runs][:1] == [
        (reporting.TRACKER_PROJECT, f"dpo-{run_id}", run_id)
    ]
    records = reporting.read_metrics(work / "runs" / "dpo" / "metrics.jsonl")
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    for logged, record in zip(history, records):
        assert {k: v for k, v in logged.items() if not k.startswith("_")} == {
            k: v for k, v in record.items() if k != "step"
        }
    assert config["max_steps"] == 4 and config["report_to"] == "wandb,tensorboard"
    assert config["push_to_hub"] == "someone/tiny-dpo"
    assert "wandb sync" in proc.stdout + proc.stderr  # wandb says how to upload the offline run later

    # the Hub: the token accepted before training, the upload refused after the save
    assert proc.returncode == 1
    assert (
        "--push_to_hub someone/tiny-dpo: logged in to the Hub as someone; the upload follows the training"
        in proc.stdout
    )
    last = proc.stderr.strip().splitlines()[-1]  # after the training's progress bars
    assert last.startswith("error: --push_to_hub someone/tiny-dpo: the upload failed ("), proc.stderr[-2000:]
    assert "403" in last and "rights to create a model" in last
    assert last.endswith(
        f"the model is saved in {work / DPO_DIR}: upload it later with `hf upload someone/tiny-dpo {work / DPO_DIR}`"
    )
    assert "Traceback" not in proc.stderr and "hf_not_a_real_token" not in proc.stdout + proc.stderr
    assert ModelCard.load(work / DPO_DIR / "README.md").data.model_name == "DPO policy from tiny_gpt2"


@pytest.mark.slow
def test_wandb_without_a_login_is_one_line_with_the_offline_hint(tiny_data_dir, tmp_path, monkeypatch):
    """Trainer starts the reward model's trackers (a real run); accelerate the loops' (start_tracking, here)."""
    pytest.importorskip("wandb")
    import DPO_training as dpo

    work = tmp_path / "work"
    work.mkdir()
    (work / PROCESSED_DIR).symlink_to(tiny_data_dir / PROCESSED_DIR)
    env = {k: v for k, v in SCRIPT_ENV.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    quick = ["--preset", "tiny", "--max_steps", 2, "--max_eval_samples", 8, "--work_dir", work, "--report_to", "wandb"]
    proc = run_script("reward_model_training.py", *quick, check=False, env=env)
    start = "error: --report_to wandb: a tracker did not start ("
    hint = "; WANDB_MODE=offline keeps a wandb run on disk (`wandb sync` uploads it later)"
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(start) and "API key" in last and last.endswith(hint), proc.stderr
    assert "Traceback" not in proc.stderr

    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    args = parse_args(dpo.Args, dpo.TINY, ["--work_dir", str(work), "--report_to", "wandb"])
    accelerator = common.make_accelerator(args, work / "runs" / "dpo")
    with pytest.raises(UserError) as error:
        reporting.start_tracking(accelerator, args, work / "runs" / "dpo", "dpo", None)
    message = f"error: {error.value}"
    assert message.startswith(start) and "API key" in message and message.endswith(hint) and "\n" not in message


def test_a_tracker_that_is_not_installed_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    import PPO_training as ppo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["PPO_training.py", "--preset", "tiny", "--work_dir", str(tmp_path)])
    for report_to, message in [
        ("tensorboard,wandb", "error: --report_to wandb: wandb is not installed (pip install wandb)"),
        ("mlflow", "error: --report_to 'mlflow': expected none or a comma list of tensorboard, wandb, trackio"),
    ]:
        monkeypatch.setattr(sys, "argv", [*sys.argv[:5], "--report_to", report_to])
        with pytest.raises(SystemExit) as exit:
            lifecycle.run(lambda args: pytest.fail("trained without its tracker"), ppo.Args, ppo.TINY)
        assert str(exit.value) == message
    assert not (tmp_path / "runs").exists()


def test_trackio_when_not_installed_is_refused_before_any_work(tmp_path):
    if importlib.util.find_spec("trackio"):
        pytest.skip("trackio is installed here: nothing to refuse")
    proc = run_script(
        "GRPO_training.py", "--preset", "tiny", "--work_dir", tmp_path, "--report_to", "trackio", check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --report_to trackio: trackio is not installed (pip install trackio)"


METHODS = {
    SFT_DIR: "sft",
    REWARD_MODEL_DIR: "reward_model",
    GOLD_REWARD_MODEL_DIR: "reward_model",
    PPO_DIR: "ppo",
    GRPO_BEST_DIR: "grpo",
    GRPO_FINAL_DIR: "grpo",
    DPO_DIR: "dpo",
}
CARDS = {  # folder: (method tag, title start, whether evaluate_models.py adds its summary row)
    SFT_DIR: ("sft", "SFT model from tiny_gpt2", True),
    REWARD_MODEL_DIR: ("reward-model", "reward model from tiny_gpt2", False),
    GOLD_REWARD_MODEL_DIR: ("reward-model", "gold reward model from tiny_gpt2", False),
    PPO_DIR: ("ppo", "PPO policy from tiny_gpt2", True),
    GRPO_BEST_DIR: ("grpo", "GRPO policy, best step", True),
    GRPO_FINAL_DIR: ("grpo", "GRPO policy, step 30", False),
    DPO_DIR: ("dpo", "DPO policy from tiny_gpt2", True),
}


def test_every_model_folder_has_a_card_with_its_own_figures(tiny_pipeline):
    summary = pd.read_excel(tiny_pipeline / "rlhf_eval_results_with_base.xlsx", sheet_name="summary").set_index("model")
    for folder, (tag, title, evaluated) in CARDS.items():
        path = tiny_pipeline / folder
        card = ModelCard.load(path / "README.md")
        data = card.data.to_dict()
        assert data["library_name"] == "transformers" and data["license"] == "mit", folder
        # the Hub refuses a card whose base or data is not a hub id: the tiny ones are named in the text
        assert "base_model" not in data and "datasets" not in data, folder
        assert "Base model: the local model `tiny_gpt2`; data: the local data set `tiny_hh`" in card.text
        assert {tag, "rlhf", "tiny-preset"} <= set(data["tags"]), folder
        assert card.data.model_name.startswith(title), (folder, card.data.model_name)
        # the figures: every number of eval_results.json in the table, the headline ones in model-index as stored
        results = reporting.flatten(json.loads((path / "eval_results.json").read_text()))
        assert results and card.data.eval_results, folder
        headline = {name: key for key, _, name in reporting.CARDS[METHODS[folder]][4]}
        assert [r.metric_name for r in card.data.eval_results] == [n for n, k in headline.items() if k in results]
        for result in card.data.eval_results:
            assert result.metric_value == results[headline[result.metric_name]], (folder, result.metric_name)
        for key, value in results.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            assert f"| `{key}` | {shown} |" in card.text, (folder, key)
        # what made it, and the curves beside it
        args = json.loads((path / "args.json").read_text())
        work_dir = os.path.basename(args["work_dir"])  # a card is published: no path of this machine in it
        assert f"--work_dir {work_dir}" in card.text and f"| `seed` | `{args['seed']}` |" in card.text
        assert args["work_dir"] not in card.text and str(lifecycle.REPO_DIR) not in card.text, folder
        (png,) = [name for name in os.listdir(path) if name.endswith("_curves.png")]
        assert f"![training curves]({png})" in card.text
        assert "> **Tiny preset.**" in card.text
        # the evaluation's summary row, where it has one
        assert (reporting.EVALUATION_HEADING in card.text) == evaluated, folder
        if evaluated:
            name = {GRPO_BEST_DIR: "grpo"}.get(folder, folder.split("_")[0])
            shown = list(dict.fromkeys(["base", "sft", name]))  # a policy's card: base, the SFT model it started from
            for column in ("reward_mean", "kl_mean", "oracle_good"):
                row = f"| `{column}` | " + " | ".join(f"{summary.loc[m, column]:.3f}" for m in shown) + " |"
                assert row in card.text, (folder, column)
    assert "--train_split gold_train" in ModelCard.load(tiny_pipeline / GOLD_REWARD_MODEL_DIR / "README.md").text


def test_a_gpt2_card_names_the_hub_model_and_data_and_a_rerun_evaluation_replaces_its_row(tmp_path):
    import PPO_training as ppo

    args = parse_args(ppo.Args, ppo.TINY, ["--work_dir", str(tmp_path), "--total_steps", "900"])
    results = {"prompts": 150, "ppo": {"score": 1.25, "kl": 3.5}, "base": {"score": 0.5, "kl": 0.0}}
    reporting.model_card("ppo", args, results, "PPO_training.py", ppo.TINY, curves="ppo_curves.png").save(
        tmp_path / "README.md"
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "gpt2" and card.data.datasets == ["Anthropic/hh-rlhf"]
    assert card.data.license == "mit" and "tiny-preset" not in card.data.tags and "Tiny preset" not in card.text
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("reward", 1.25), ("kl", 3.5)]
    assert f"python PPO_training.py --preset gpt2 --work_dir {tmp_path.name} --total_steps 900\n" in card.text
    assert "[gpt2](https://huggingface.co/gpt2)" in card.text and str(tmp_path) not in card.text
    for table in ("| figure | base | ppo |\n| `kl_mean` | 0 | 1 |", "| figure | base | ppo |\n| `kl_mean` | 0 | 2 |"):
        reporting.add_evaluation_to_card(tmp_path, table, "python evaluate_models.py --preset gpt2")
    card = ModelCard.load(tmp_path / "README.md")
    assert (
        card.text.count(reporting.EVALUATION_HEADING) == 1 and "| 0 | 2 |" in card.text and "| 0 | 1 |" not in card.text
    )
    assert card.data.eval_results[0].metric_value == 1.25  # the metadata kept


class FakeHub(JsonHandler):
    """The Hub's answers a push meets: who the token is (a 401 for `hf_wrong`), a refused create_repo, no repo."""

    def do_GET(self):
        if not self.path.startswith("/api/whoami"):  # create_repo's look for a repo that already exists
            return self.reply(404, {"error": "Repository not found"})
        if "hf_wrong" in self.headers.get("authorization", ""):
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        self.reply(200, {"type": "user", "name": "someone", "auth": {"type": "access_token"}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.reply(403, {"error": 'You don\'t have the rights to create a model under the namespace "someone"'})


@pytest.fixture
def fake_hub():
    server, url = serve(FakeHub)
    yield url.removesuffix("/v1")
    server.shutdown()


def test_push_to_hub_checks_its_repo_its_token_and_the_hub_before_training(tmp_path, fake_hub, monkeypatch):
    import huggingface_hub.constants

    import DPO_training as dpo

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    argv = ["DPO_training.py", "--preset", "tiny", "--work_dir", str(tmp_path / "work"), "--push_to_hub"]
    for repo, offline, token, message in [
        ("not a/valid/repo", False, None, "error: --push_to_hub 'not a/valid/repo': "),
        ("someone/tiny-dpo", True, "hf_x", "error: --push_to_hub: the Hub is offline here (HF_HUB_OFFLINE=1"),
        (
            "someone/tiny-dpo",
            False,
            None,
            "error: --push_to_hub: no Hugging Face token: set HF_TOKEN or run `hf auth login`",
        ),
        (
            "someone/tiny-dpo",
            False,
            "hf_wrong",
            "error: --push_to_hub: the Hub did not accept the token (Invalid user token.",
        ),
    ]:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(sys, "argv", [*argv, repo])
        with pytest.raises(SystemExit) as exit:
            lifecycle.run(lambda args: pytest.fail("trained before the checks"), dpo.Args, dpo.TINY)
        assert str(exit.value).startswith(message) and "\n" not in str(exit.value), str(exit.value)
        assert "hf_wrong" not in str(exit.value)
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    lifecycle.check_push(parse_args(dpo.Args, dpo.TINY, ["--push_to_hub", "someone/tiny-dpo"]))  # passes
    assert not (tmp_path / "work" / "runs").exists()


def test_push_to_hub_sends_the_finished_folder_with_its_card(tiny_pipeline, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hub/{repo_id}",
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    folder = shutil.copytree(tiny_pipeline / PPO_DIR, tmp_path / PPO_DIR)
    reporting.push_folder(folder, "someone/tiny-ppo")
    assert [(kind, repo) for kind, repo, _ in calls] == [("create", "someone/tiny-ppo"), ("upload", "someone/tiny-ppo")]
    assert calls[0][2] == {"exist_ok": True} and calls[1][2]["folder_path"] == str(folder)
    assert calls[1][2]["ignore_patterns"] == ["*.tmp-*"]  # a killed card update's leftover stays home
    sent = set(os.listdir(folder))
    assert {
        "README.md",
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "eval_results.json",
        "ppo_curves.png",
    } <= sent

    def refused(self, **kw):
        raise OSError("403 Forbidden: you cannot write to someone/tiny-ppo")

    monkeypatch.setattr(HfApi, "upload_folder", refused)
    with pytest.raises(UserError, match=r"the upload failed \(403 Forbidden: you cannot write to someone/tiny-ppo\)"):
        reporting.push_folder(folder, "someone/tiny-ppo")
