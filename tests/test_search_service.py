"""launch.py as a service: retries (max_failures), --resume after the driver is killed, wandb runs,
--dry-run and the dashboard's bind address. Real Ray, Optuna, wandb (offline) and smp models."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from ray.tune import ExperimentAnalysis

from errors import UserError
from search.space import load_space
from search.tune_runner import auth_token_path

from .conftest import ROOT, cache_unreadable_weights, run_cli

SPACE = """
experiment: {num_samples: 2, max_epochs: 2, grace_period: 2, reduction_factor: 2, seed: 0, cpus_per_trial: 1}
space:
  decoder: Unet
  backbone: {choice: [resnet18, mobilenet_v2]}
  loss: ce
  augmentation: none
  resize: 64
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  batch_size: 8
"""


def _leaderboard(path):
    with open(path / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


def test_dry_run_validates_and_prints_the_plan_without_starting_ray(sample_root, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    result = run_cli("launch.py", "--dry-run", "--space", tmp_path / "space.yaml", "--data", sample_root,
                     "--storage", tmp_path / "runs", "--name", "plan", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Dry run: nothing started." in out and "Ray dashboard" not in out
    assert "Trials: 2, up to 2 at once" in out and "each 1 CPUs, 0 GPUs" in out
    assert "Epochs: up to 2; ASHA grace_period 2, reduction_factor 2" in out and "max_failures 1" in out
    assert "backbone: choice ['resnet18', 'mobilenet_v2']" in out and "lr: loguniform [0.001, 0.01]" in out
    assert not (tmp_path / "runs").exists()
    # it validates what launch validates: a missing data root is the same one-line error
    result = run_cli("launch.py", "--dry-run", "--space", tmp_path / "space.yaml", "--data", tmp_path / "none",
                     "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr and result.stderr.count("\n") == 1
    # a dashboard reachable from other machines is allowed, with a warning
    result = run_cli("launch.py", "--dry-run", "--space", tmp_path / "space.yaml", "--data", sample_root,
                     "--dashboard-host", "0.0.0.0", "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 0 and "warning: the Ray dashboard will listen on 0.0.0.0" in result.stderr
    assert "run code for anyone who reaches them" in result.stderr


def test_resume_of_a_missing_or_foreign_folder_and_bad_max_failures_are_one_line_errors(tmp_path):
    (tmp_path / "runs" / "plain").mkdir(parents=True)
    for name, message in [("missing", "does not exist"), ("plain", "is not an experiment started by launch.py")]:
        result = run_cli("launch.py", "--resume", "--name", name, "--storage", tmp_path / "runs", timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    result = run_cli("launch.py", "--resume", "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 2 and "--resume needs --name" in result.stderr
    result = run_cli("launch.py", "--address", "127.0.0.1:9", "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--address 127.0.0.1:9: nothing answers there" in result.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["plain"]  # no half-made experiment left behind
    (tmp_path / "bad.yaml").write_text(SPACE.replace("cpus_per_trial: 1", "cpus_per_trial: 1, max_failures: -1"))
    with pytest.raises(UserError, match="experiment.max_failures must be >= 0, got -1"):
        load_space(tmp_path / "bad.yaml")


def test_a_failing_trial_is_retried_max_failures_times_then_errored(sample_root, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE.replace("num_samples: 2", "num_samples: 1")
                                         .replace("cpus_per_trial: 1", "cpus_per_trial: 1, max_failures: 1")
                                         + "  encoder_weights: imagenet\n")
    result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root, "--no-wandb",
                     "--storage", tmp_path / "runs", "--name", "retried", env=cache_unreadable_weights(tmp_path / "hf", "resnet18", "mobilenet_v2"))
    assert result.returncode == 1 and "no trial reported a val mIoU" in result.stderr, result.stderr[-3000:]
    assert "1 trial(s) errored (each tried 2 time(s))" in result.stderr
    experiment = tmp_path / "runs" / "retried"
    [row] = _leaderboard(experiment)
    assert row["status"] == "errored"
    [trial] = ExperimentAnalysis(str(experiment)).trials
    assert trial.status == "ERROR" and trial.num_failures == 2  # the first attempt and one retry
    [error_file] = experiment.glob(f"*{row['trial_id']}*/error.txt")
    assert "cannot load " in error_file.read_text()


def _wandb_records(path):
    """wandb's Record protobufs from a .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log framing (32 KiB blocks; records of crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        block_left = 32768 - position % 32768
        if block_left < 7:  # block trailer
            position += block_left
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        if kind == 0 and length == 0:  # zero padding
            position += block_left
            continue
        payload, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(run_dir):
    """The metrics rows a wandb run logged, read from its .wandb file."""
    [path] = run_dir.glob("*.wandb")
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in _wandb_records(path) if record.WhichOneof("record_type") == "history"]


def _wandb_config(run_dir):
    [path] = run_dir.glob("*.wandb")
    config = {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        config.update({item.key: json.loads(item.value_json) for item in items if item.key})
    return config


def test_each_trial_logs_a_wandb_offline_run_beside_the_experiment(sample_root, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.pop("WANDB_MODE", None)  # offline is launch.py's own default
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--space", str(tmp_path / "space.yaml"),
                             "--data", str(sample_root), "--storage", str(tmp_path / "runs"), "--name", "logged"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**env, "WANDB_DIR": str(tmp_path / "elsewhere")})
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / "runs" / "logged"
    runs = sorted((experiment / "wandb").glob("offline-run-*"))
    trial_ids = {r["trial_id"] for r in _leaderboard(experiment)}
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == trial_ids
    for run in runs:
        history = _wandb_history(run)
        assert [row["training_iteration"] for row in history] == [1, 2]
        assert all(0 <= row["val_miou"] <= 1 for row in history)
        config = _wandb_config(run)
        assert config["backbone"] in ("resnet18", "mobilenet_v2") and config["max_epochs"] == 2
    assert not (tmp_path / "elsewhere").exists()



def _processes():
    """{pid: (ppid, session id, cmdline)} of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            if stat[0] == "Z":
                continue  # ended, not reaped yet
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry)] = (int(stat[1]), int(stat[3]), cmdline)
    return found


def _family(root: int, procs) -> set[int]:
    """root's descendants and every process of its session (the driver was started in a session of its own)."""
    family, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in family} - family
        family |= more
        grew = bool(more)
    return family | {pid for pid, (_, sid, _) in procs.items() if sid == root}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on port (IPv4 and IPv6), from /proc/net/tcp*."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(__import__("ipaddress").ip_address(words)))
    return found


def _terminated_trials(experiment) -> set[str]:
    done = set()
    for state in experiment.glob("experiment_state-*.json"):
        try:
            trial_data = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):
            continue  # being written
        for entry in trial_data:
            trial = json.loads(entry[0])
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def _dashboard_status(port: int, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_resume_continues_a_search_whose_driver_was_killed(sample_root, tmp_path):
    cpus = os.cpu_count()
    (tmp_path / "space.yaml").write_text(SPACE.replace("num_samples: 2", "num_samples: 4")
                                         .replace("cpus_per_trial: 1", f"cpus_per_trial: {cpus}"))
    experiment = tmp_path / "runs" / "resumable"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--space", str(tmp_path / "space.yaml"),
                               "--data", str(sample_root), "--storage", str(tmp_path / "runs"), "--name", "resumable",
                               "--no-wandb"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    family = set()
    try:
        deadline, finished, port = time.time() + 400, set(), None
        while not finished:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in time"
            if port is None and (url := re.search(r"Ray dashboard: http://127\.0\.0\.1:(\d+)",
                                                  (tmp_path / "driver.log").read_text())):
                port = int(url.group(1))
                # the dashboard listens on the loopback interface only, and only answers with Ray's token
                assert _listening_addresses(port) == {"127.0.0.1"}, _listening_addresses(port)
                assert _dashboard_status(port, token=None) == 401
                assert _dashboard_status(port, token=auth_token_path().read_text().strip()) == 200
                assert auth_token_path().stat().st_mode & 0o077 == 0  # readable by its owner only
            time.sleep(1)
            finished = _terminated_trials(experiment)
        assert port is not None
        family = _family(driver.pid, _processes())
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        # Ray's processes outlive the driver and may ignore SIGTERM: end them by pid, with any the
        # raylet started meanwhile (still in the driver's session)
        for _ in range(5):
            family |= _family(driver.pid, _processes())
            alive = [pid for pid in family if pid in _processes()]
            if not alive:
                break
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        log.close()
    assert not [pid for pid in family if pid in _processes()], "Ray processes of the killed driver survive"
    assert len(finished) < 4  # the kill came before the search ended
    before = {t: len((next(experiment.glob(f"*{t}*")) / "result.json").read_text().splitlines()) for t in finished}
    assert set(before.values()) == {2}

    refused = run_cli("launch.py", "--resume", "--name", "resumable", "--storage", tmp_path / "runs", "--wandb", "offline")
    assert refused.returncode == 2 and "was started with --no-wandb" in refused.stderr.strip().splitlines()[-1]
    result = run_cli("launch.py", "--resume", "--name", "resumable", "--storage", tmp_path / "runs")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _leaderboard(experiment)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    # trial n of the study trains from seed + n; a resumed study numbers on, so no two trials share a seed
    assert len({int(r["seed"]) for r in rows}) == 4 and min(int(r["seed"]) for r in rows) == 0
    assert all(r["status"] == "finished" and r["best_val_miou"] for r in rows)
    assert finished <= {r["trial_id"] for r in rows}
    # the resumed search shows its progress too: a row for each trial that ended in it, under a header
    assert re.search(r"^trial\s.*\sepochs\s+best_val_miou\s+status", result.stdout, re.M), result.stdout
    for trial_id in {r["trial_id"] for r in rows} - finished:
        assert re.search(rf"^{trial_id}\s.*\sfinished\s", result.stdout, re.M), result.stdout
    for trial_id, lines in before.items():  # kept, not run again
        assert len((next(experiment.glob(f"*{trial_id}*")) / "result.json").read_text().splitlines()) == lines
    assert json.loads((experiment / "launch.json").read_text())["num_samples"] == 4


def test_fractional_fake_gpus_pack_eight_trials_at_once_each_with_a_gpu_id(sample_root, tmp_path):
    import ray

    from search.tune_runner import concurrency, run_search, start_ray

    (tmp_path / "space.yaml").write_text(
        # 16 epochs a trial (~30 s): eight actors importing torch share two cores, so the first trials
        # start ~15-20 s before the last; shorter trials could end before the eighth had started (and its
        # trial would reuse a finished one's actor and GPU)
        SPACE.replace("num_samples: 2, max_epochs: 2, grace_period: 2", "num_samples: 8, max_epochs: 16, grace_period: 16")
        .replace("cpus_per_trial: 1", "cpus_per_trial: 0.25, gpus_per_trial: 0.5").replace("resize: 64", "resize: 32"))
    spec = load_space(tmp_path / "space.yaml")
    assert concurrency(spec.experiment, 2, 4) == 8
    start_ray(4, cpus=2)  # 4 GPUs Ray believes in; torch inside the trials sees none and uses the CPU
    try:
        experiment = run_search(spec, sample_root, storage=tmp_path / "runs", name="fake-gpus", gpus=4)
    finally:
        ray.shutdown()
    results = [t.last_result for t in ExperimentAnalysis(str(experiment)).trials]
    assert len(results) == 8 and all(r.get("val_miou") is not None for r in results), results
    ids = [r["gpu_ids"] for r in results]
    assert all(len(i) == 1 for i in ids) and {i[0] for i in ids} == {"0", "1", "2", "3"}
    assert sorted(sum(ids, [])) == ["0", "0", "1", "1", "2", "2", "3", "3"]  # two half-GPU trials per GPU
    assert len({r["pid"] for r in results}) == 8  # eight actors: none was free to reuse
    starts = [r["timestamp"] - r["time_total_s"] for r in results]
    ends = [r["timestamp"] + 1 for r in results]  # Ray's timestamps are whole seconds, rounded down
    assert max(starts) <= min(ends), (starts, ends)  # all eight ran at the same time


def test_a_search_joining_a_two_node_cluster_runs_trials_on_both_and_writes_one_experiment(sample_root, tmp_path):
    from ray.cluster_utils import Cluster

    (tmp_path / "space.yaml").write_text(
        # 3 epochs a trial: with bf16 on an AMX CPU one-epoch trials could all finish on the head node's
        # reused actor before the second node's worker started
        SPACE.replace("num_samples: 2, max_epochs: 2, grace_period: 2", "num_samples: 4, max_epochs: 3, grace_period: 3")
        .replace("resize: 64", "resize: 32"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        cluster.add_node(num_cpus=1, num_gpus=0)
        cluster.wait_for_nodes()
        result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root, "--address",
                         cluster.address, "--storage", tmp_path / "runs", "--name", "two-nodes", "--no-wandb")
        nodes = {node.node_id for node in cluster.list_all_nodes()}
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "runs" / "two-nodes"
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()] == ["two-nodes"]  # one experiment for both nodes
    results = [t.last_result for t in ExperimentAnalysis(str(experiment)).trials]
    assert len(results) == 4 and all(r.get("val_miou") is not None for r in results)
    assert {r["node_id"] for r in results} == nodes and len(nodes) == 2  # trials ran on both nodes
    assert len(_leaderboard(experiment)) == 4


def test_a_time_budget_ends_the_search_with_trials_that_planned_their_end_and_kept_their_best(sample_root, tmp_path):
    # Two trials at once; the other two would start in the budget's last seconds and are never begun.
    (tmp_path / "space.yaml").write_text(
        "experiment: {num_samples: 4, max_epochs: 500, scheduler: fifo, cpus_per_trial: 1}\n"
        "space: {decoder: Unet, backbone: resnet18, resize: 64, batch_size: 8, lr: {loguniform: [1.0e-3, 3.0e-3]}}\n")
    started = time.monotonic()
    result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root, "--time-budget", "40s",
                     "--storage", tmp_path / "runs", "--name", "budget", "--no-wandb")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert time.monotonic() - started < 150  # 500 epochs would take many minutes
    with open(tmp_path / "runs" / "budget" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0 < int(r["epochs"]) < 500 for r in rows if r["best_val_miou"])
    assert len(rows) == 2 and {r["status"] for r in rows} == {"cut by budget"}
    assert "no more trials start" in (tmp_path / "runs" / "budget" / "driver.log").read_text()
    assert result.stdout.count("no more trials start") == 1  # said once, on the console too
    assert json.loads((tmp_path / "runs" / "budget" / "launch.json").read_text())["time_budget_s"] == 40
    from ray.tune import ExperimentAnalysis

    frames = [f for f in ExperimentAnalysis(str(tmp_path / "runs" / "budget")).trial_dataframes.values() if len(f)]
    ended_by_plan = [f for f in frames if f["epoch"].iloc[-1] == f["planned_epochs"].iloc[-1] < 500]
    assert ended_by_plan  # not cut off by Tune: their lr schedules ended with them


@pytest.mark.parametrize("value", ["0", "1h30", "soon"])
def test_a_bad_time_budget_is_a_usage_error(value, tmp_path):
    result = run_cli("launch.py", "--time-budget", value, "--dry-run", "--storage", tmp_path)
    assert result.returncode == 2 and "argument --time-budget:" in result.stderr and "Traceback" not in result.stderr


def test_the_budget_limiter_starts_no_trial_that_cannot_train_its_minimum_epochs(monkeypatch, tmp_path):
    from ray.tune.search import ConcurrencyLimiter, Searcher
    from ray.tune.search.optuna import OptunaSearch

    from search.space import SpaceSampler
    from search.trainable import DEADLINE_ENV
    from search.tune_runner import BudgetLimiter

    (tmp_path / "space.yaml").write_text("experiment: {max_epochs: 8, scheduler: fifo}\n"
                                         "space: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    spec = load_space(tmp_path / "space.yaml")
    assert spec.experiment.useful_epochs == 2  # a quarter of max_epochs
    optuna = OptunaSearch(space=SpaceSampler(spec.params, {}), metric="val_miou", mode="max", seed=0)
    limiter = BudgetLimiter(ConcurrencyLimiter(optuna, max_concurrent=4), spec.experiment.useful_epochs)
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 100))
    assert "lr" in limiter.suggest("a")  # no pace known yet: the first trials start
    for epoch, epoch_time in enumerate((30.0, 20.0, 20.0), 1):  # the first epoch (slower: it warms up) is left out
        limiter.on_trial_result("a", {"epoch_time_s": epoch_time, "setup_time_s": 5.0, "val_miou": 0.1,
                                      "training_iteration": epoch})
    assert limiter.seconds_needed() == 5.0 + 1.1 * 2 * 20.0
    assert "lr" in limiter.suggest("b")  # 49 s needed, 100 s left
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 40))
    assert limiter.suggest("c") == Searcher.FINISHED
    monkeypatch.delenv(DEADLINE_ENV)
    assert "lr" in limiter.suggest("d")  # no budget, no limit
