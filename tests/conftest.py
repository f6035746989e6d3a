"""Shared fixtures: one tiny processed data set (and reward model) per test session.

Tests call the scripts the way a user does (`main(parse_args(Args, TINY, argv))` or a
subprocess), into temporary work folders; nothing touches the network.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLE = REPO.parent / "shared" / "hh-rlhf-sample" / "harmless-base-test-first500.jsonl.gz"


# one BLAS thread, as run_pipeline.sh runs the tiny preset: the tests then train what the pipeline trains
SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# The session's reward model and pipeline log to TensorBoard too (test_tracking.py reads the events back)
TRACKED = ["--report_to", "tensorboard"]


def run_script(script, *argv, check=True, timeout=900, env=None):
    """Run a pipeline script in a subprocess, as a user would (`env`: instead of SCRIPT_ENV); returns the
    CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=SCRIPT_ENV if env is None else env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# as run_pipeline.sh runs a stage into a log file: progress bars redraw every 30 s, not ten times a second
LOG_FILE_ENV = {**SCRIPT_ENV, "TQDM_MININTERVAL": "30"}


def bar_counts(stderr, desc):
    """The count shown by every state drawn of the progress bar `desc` ("grpo:  50%|... 1/2 [..." -> 1)."""
    states = re.findall(rf"^{desc}: +\d+%\|[^|]*\| *(\d+)/\d+", stderr.replace("\r", "\n"), re.MULTILINE)
    return [int(n) for n in states]


def free_port():
    """A free TCP port of 127.0.0.1, for `accelerate launch --main_process_port` (tests may run side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script, *argv, timeout=600):
    """`accelerate launch` of `script` on 2 CPU processes (gloo, one thread each, a free port): the CompletedProcess.
    On CPU, `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its simple launcher);
    two need the multi-process launcher (`--multi_gpu`) with ACCELERATE_USE_CPU set."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    return subprocess.run(
        [*launch, str(script), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )


def kill_when(script, *argv, moment, log, timeout=600, sig=signal.SIGKILL):
    """Start a pipeline script and SIGKILL it (or send `sig`) as soon as `moment()` holds, as a pre-empted
    job dies. Returns its output.

    Polls every 10 ms; fails if the script ends before the moment (the test would then prove nothing).
    Output goes to the file `log`, not a pipe: a full pipe would block the script."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / script), *map(str, argv)], stdout=out, stderr=out, env=SCRIPT_ENV
        )
        deadline = time.time() + timeout
        while not moment():
            assert proc.poll() is None, f"{script} ended before the moment to kill it:\n{Path(log).read_text()[-2000:]}"
            assert time.time() < deadline, f"{script}: the moment never came"
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    output = Path(log).read_text()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, f"{script} ended on its own ({proc.returncode}):\n{output[-2000:]}"
    return output


def same_records(a, b):
    """Two metrics.jsonl files hold the same records, step for step, times and memory aside."""
    from reporting import read_metrics

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("time/elapsed_s", "mem/peak_mb")} for r in records]

    return strip(read_metrics(a)) == strip(read_metrics(b))


def tensorboard_scalars(folder):
    """{tag: {step: value}} of the event files in `folder`, read with TensorBoard's own reader (which drops the
    events a resumed run logs again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def assert_same_as_metrics(scalars, records, skip=()):
    """Every number of every metrics.jsonl record is in `scalars` at its step, equal as float32 (TensorBoard's
    type); and the tracker holds no step the log does not."""
    for record in records:
        for key, value in record.items():
            if key == "step" or key in skip or not isinstance(value, (int, float)):
                continue
            assert key in scalars, f"{key} is not in the events"
            assert record["step"] in scalars[key], f"{key}: no event at step {record['step']}"
            assert scalars[key][record["step"]] == numpy.float32(value), (key, record["step"])
    logged = {key: {r["step"] for r in records if key in r} for key in scalars}
    for key, steps in scalars.items():
        if logged[key]:  # Trainer's own timings (eval/runtime, ...) are not in our log
            assert set(steps) == logged[key], key


def snapshot_weights(run_dir):
    """{step: {name: tensor}} of the policy snapshots in a run folder (runs/<name>/snapshots/step-N/)."""
    from safetensors.torch import load_file

    from lifecycle import snapshots

    return {step: load_file(folder / "model.safetensors") for step, folder in snapshots(run_dir)}


def assert_same_snapshots(run_dir, reference_dir, steps, **tolerance):
    """Both runs hold snapshots at exactly `steps`, with the same weights."""
    import torch

    ours, reference = snapshot_weights(run_dir), snapshot_weights(reference_dir)
    assert list(ours) == list(reference) == list(steps), (list(ours), list(reference))
    for step, tensors in reference.items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(ours[step][name], tensor, msg=f"step {step}: {name}", **tolerance)


def resumed_and_straight(script, final_dir, work, straight, quick, weights):
    """PPO's and GRPO's whole-resume check: a run of 4 steps straight through, and one of 2 steps that is refused a
    --resume to --total_steps 1 and then resumed to 4, keep the same snapshots (step 2's, the 2-step run's final
    model, comes from the checkpoint) and the same final weights. Returns both runs' metrics records."""
    import pytest
    import torch

    from lifecycle import PROCESSED_DIR, REWARD_MODEL_DIR, UserError, parse_args
    from reporting import read_metrics

    for name in (PROCESSED_DIR, REWARD_MODEL_DIR):
        (straight / name).symlink_to(work / name)

    def args(folder, *argv):
        argv = ["--preset", "tiny", "--work_dir", folder, *argv, *quick, "--snapshot_every", 1]
        return parse_args(script.Args, script.TINY, list(map(str, argv)))

    script.main(args(straight, "--total_steps", 4))
    script.main(args(work, "--total_steps", 2))
    with pytest.raises(UserError, match="at step 2 > --total_steps"):
        script.main(args(work, "--total_steps", 1, "--resume"))
    script.main(args(work, "--total_steps", 4, "--resume"))
    run = Path("runs") / script.RUN_NAME
    assert_same_snapshots(work / run, straight / run, [1, 2, 3], rtol=0, atol=0)
    resumed, reference = weights(work / final_dir), weights(straight / final_dir)
    assert list(resumed) == list(reference)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], msg=name)
    return tuple(read_metrics(folder / final_dir / "metrics.jsonl") for folder in (work, straight))


def dead_pid():
    """The id of a process that has just ended (what a killed run's leftovers are named after)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class JsonHandler(BaseHTTPRequestHandler):
    """A fake server's handler: `reply` sends a JSON body; requests are not logged to the test output."""

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the listen backlog (5 by default): a 6th connection at once would wait 1 s


def serve(handler):
    """Serve `handler` on a free port of 127.0.0.1 in a daemon thread: the server and its OpenAI-style URL."""
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def delays(monkeypatch):
    """The judge's backoff sleeps, recorded instead of slept."""
    import judge

    slept = []
    monkeypatch.setattr(judge.time, "sleep", slept.append)
    return slept


# The demo pipeline, which most learning tests read, trains in the background from the session's first test
# when a collected test needs it, one stage at a time on one thread, while the other tests run (`-n 2`: on two
# pytest-xdist workers); those that read it run last. Every worker shares one pipeline and one tiny data set: the
# first to need one builds it under a file lock in the folder all workers share, the others wait for it.
PIPELINE_LEVELS = {"tiny_pipeline": 3, "tiny_reward_dir": 2, "tiny_data_dir": 1}  # what a test waits for, at most


def pipeline_level(item):
    return max((level for name, level in PIPELINE_LEVELS.items() if name in item.fixturenames), default=0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Tests that need nothing shared first, then those on the tiny data, the reward model, the pipeline."""
    items.sort(key=pipeline_level)


def pytest_configure(config):
    """An xdist worker computes on one thread, as the scripts the tests start do: two workers, two cores. And the
    Ctrl-C tests' scripts must hear SIGINT: pytest started as a background job of a shell without job control
    ignores it, and every script it starts would inherit that."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def shared_root(tmp_path_factory):
    """The folder every worker of this session shares (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(path, build, *args):
    """`build(path, *args)` unless another worker of the session has (or is doing it): `path`, complete."""
    from filelock import FileLock

    with FileLock(f"{path}.lock"):
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            build(path, *args)
            (path / ".built").touch()
    return path


class BackgroundPipeline:
    """`bash run_pipeline.sh --preset tiny --jobs 1 --report_to tensorboard` with one thread, in the background,
    once per session. Each stage computes what it computes in the README's demo (there a stage beside another has
    one thread too, and the evaluation's processes one each); `wait_for(name)` blocks until `name` is there."""

    def __init__(self, root):
        self.work, self.status = root / "tiny_pipeline", root / "tiny_pipeline.status"  # the runner's exit code
        self.log, self.proc = self.work / "pipeline.log", None  # what the runner printed

    def start(self):
        from filelock import FileLock

        with FileLock(f"{self.work}.lock"):
            if self.work.exists():  # another worker started it
                return
            self.work.mkdir()
            runner = [str(REPO / "run_pipeline.sh"), "--preset", "tiny", "--work_dir", str(self.work), "--jobs", "1"]
            # the shell writes the status when the runner ends, even after the worker that started it has ended
            record = 'bash "$@"; echo $? > "$STATUS.tmp" && mv "$STATUS.tmp" "$STATUS"'
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(
                    ["sh", "-c", record, "sh", *runner, *TRACKED],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**SCRIPT_ENV, "PYTHON": sys.executable, "STATUS": str(self.status)},
                    start_new_session=True,  # its own process group: `stop` interrupts the runner and its stage
                )

    def wait_for(self, name, timeout=1800):
        """The work dir once `name` (a folder a stage writes atomically; "" for the whole pipeline) is there."""
        deadline = time.time() + timeout
        while not (name and (self.work / name).exists()):
            if self.status.exists():
                code = int(self.status.read_text())
                assert code == 0, f"run_pipeline.sh failed ({code}):\n{self.log.read_text()[-4000:]}"
                assert not name or (self.work / name).exists(), f"run_pipeline.sh ended without {name}"
                break
            assert time.time() < deadline, f"run_pipeline.sh still running after {timeout} s"
            time.sleep(1)
        return self.work

    def stop(self):
        """At the end of the worker that started it: let it finish (another worker may be waiting for it); on a
        second Ctrl-C, interrupt the runner and its stage."""
        if self.proc is None:
            return
        try:
            self.proc.wait()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)


@pytest.fixture(scope="session", autouse=True)
def background_pipeline(request, tmp_path_factory):
    """The session's demo pipeline, started with the first test when any collected test reads it (else None), so
    that it trains while the others run."""
    if not any("tiny_pipeline" in item.fixturenames for item in request.session.items):
        yield None
        return
    pipeline = BackgroundPipeline(shared_root(tmp_path_factory))
    pipeline.start()
    yield pipeline
    pipeline.stop()


def build_data(work):
    run_script("data_process.py", "--preset", "tiny", "--work_dir", work)


def build_reward_model(work, data_dir):
    (work / "processed_data").symlink_to(data_dir / "processed_data")
    run_script("reward_model_training.py", "--preset", "tiny", "--work_dir", work, *TRACKED)


@pytest.fixture(scope="session")
def tiny_data_dir(background_pipeline, tmp_path_factory):
    """A work dir holding `processed_data/` built by `data_process.py --preset tiny` (the pipeline's, when it runs)."""
    if background_pipeline:
        return background_pipeline.wait_for("processed_data")
    return build_once(shared_root(tmp_path_factory) / "tiny_data", build_data)


@pytest.fixture(scope="session")
def tiny_reward_dir(background_pipeline, tiny_data_dir):
    """A work dir with that data and `final_reward_model/` from `reward_model_training.py --preset tiny
    --report_to tensorboard` (the pipeline's, when it runs)."""
    if background_pipeline:
        return background_pipeline.wait_for("final_reward_model")
    return build_once(tiny_data_dir.parent / "tiny_reward", build_reward_model, tiny_data_dir)


@pytest.fixture
def work(tiny_reward_dir, tmp_path):
    """A fresh work dir sharing the session's processed data and reward model (links, not copies)."""
    for name in ("processed_data", "final_reward_model"):
        (tmp_path / name).symlink_to(tiny_reward_dir / name)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_pipeline(background_pipeline):
    """The README's demo pipeline (`BackgroundPipeline`), finished: the data, both reward models, PPO, GRPO, DPO,
    then the evaluation with its frontier, logging to TensorBoard. The learning tests read what it leaves; none
    writes into it."""
    return background_pipeline.wait_for("")


def pipeline_summary(work):
    """The summary sheet of the evaluation in `work`: one row per model (base first), the oracle's columns on the
    tiny data (`oracle_good`, `oracle_gain_ci_low`, ...), the truth about the replies beside the proxy's score."""
    import pandas as pd

    return pd.read_excel(work / "rlhf_eval_results_with_base.xlsx", sheet_name="summary").set_index("model")


def pipeline_output(work):
    """What the pipeline in `work` printed: the runner's own output and each log of a stage run beside another."""
    logs = sorted((work / "logs").glob("*.log")) if (work / "logs").is_dir() else []
    return "\n".join(path.read_text() for path in [work / "pipeline.log", *logs])


@contextlib.contextmanager
def counted_syncs():
    """Count the calls that make a GPU wait for the CPU to read a tensor (`.item()`, `.tolist()`, `bool`, `int`,
    `float` of a tensor) made by this project's code inside the block (not by the libraries it calls, such as
    transformers' mask checks): a list of "name file:line" per call."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}
    ours = {str(path) for path in REPO.glob("*.py")}  # the scripts and shared modules

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename in ours:
                calls.append(f"{name} {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
