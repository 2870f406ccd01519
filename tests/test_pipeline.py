"""The DAG driver (`pipelines/run.py`) as users run it, against one real shortened `make run` (tiny quickstart, its
own local Ray, a real MLflow store) in a subprocess whose output is a file (not a terminal), and the runs that follow
it on the same outputs and store, each a real driver:

* what a user sees (issue 18): progress and one summary line per stage, none of Ray's report dumps, progress bars or
  control codes; `--plan` explains each stage's decision; `lineage.py` walks the chain back to the dataset; the
  MLflow UI as printed shows the runs, a chart and the sample grid;
* lineage tags and the parent run's summary; cache hits (nothing trains, no checkpoint is added); a failing stage
  ends the console with one actionable line whose resume command gets past it; a failed train worker, then its
  resume; a driver SIGKILLed in the middle of Stage B, then the next driver resuming the same MLflow run;
* --force / --from / --until; the same outputs under a new MLflow store (Stage A adopts its checkpoint folder), then
  --clean.

One DAG run feeds them all, in this order: every later test adds runs to the store that the earlier ones count."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from ldm_core.config import ConfigError
from pipelines import run as pipeline
from pipelines.config import load_config
from tests.conftest import free_port, wait_for_port
from tests.helpers import REPO, Chromium, stop_process_group, tiny_later_stages, tiny_overrides

pytestmark = pytest.mark.slow

STAGES = ("prepare", "stage_a", "encode", "stage_b", "sample")
RAY_NOISE = ("Reporting training result", "TrainingReport(", "metrics={", "Running Dataset", "Execution plan of Dataset",
             "execution finished in", "Total Progress", "Requesting resources", "Moving model to device", "core_worker.cc",
             "Started a local Ray instance")
CONSOLE_LINES = (
    r"\[(prepare|stage_a|encode|stage_b|sample)\] ",  # progress, summaries, the DAG's decision per stage
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) [\w.]+: ",  # this project's log records
    r"\d{4}-\d\d-\d\d [\d:,]+\tWARNING authentication_token_setup\.py:\d+ -- Token authentication is enabled",  # Ray, once
    r"\d{4}/\d\d/\d\d [\d:]+ INFO mlflow\.store\.db\.utils: ",  # MLflow making a new store's tables
    r"(Successfully registered model|Created version) '",  # MLflow's model registry, once per model
    r"LPIPS \(",  # the perceptual loss says which backbone it has
    r"Done\.$", r"  (samples|\w+ metrics|MLflow): ", r" +then open http",  # the closing summary
)
"""Every line of a quiet run's console is one of these: whatever else a library starts printing shows up here."""
RAY_CORE_RECORD = r"\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\] \S+:\d+:"
"""A Ray core (C++) log record below fatal, e.g. `[2026-11-26 03:32:08,163 E 11281 11311] core_worker.cc:2465: ...`."""


def _run(cmd_args: list[str], env: dict, log: Path, timeout: int = 1200) -> tuple[int, str]:
    with open(log, "wb") as out:  # a file: the console of CI, of `ray job logs`, of `make run > log`
        proc = subprocess.run([sys.executable, *cmd_args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout)
    return proc.returncode, log.read_text(errors="replace")


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    """One shortened pipeline run (make run's command, tiny config), its console and its MLflow store."""
    tmp = tmp_path_factory.mktemp("console")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [*tiny_overrides(tmp, str(tmp / "data" / "mnist")), "data.source=mnist", "data.limit=96",
                 "data.shard_size=32", "run.name=console", f"mlflow.tracking_uri={store}", "ray.num_cpus=2",
                 *tiny_later_stages()]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LDM_VERBOSE", "LDM_LOG_LEVEL", "RAY_COLOR_PREFIX")}
    args = ["--config", "configs/quickstart.yaml", *[f"--set={o}" for o in overrides]]
    rc, console = _run(["pipelines/run.py", *args], env, tmp / "console.log")
    assert rc == 0, console[-5000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("ldm-quickstart")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])}
    return SimpleNamespace(tmp=tmp, store=store, env=env, overrides=overrides, args=args, console=console,
                           client=client, runs=runs)


@pytest.fixture
def in_process(dag, ray_local, monkeypatch):
    """The module's MLflow store as this process's, for drivers run in it (`pipeline.run_pipeline`) on the session's
    local Ray. Yields that Ray."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dag.store)
    mlflow.set_tracking_uri(dag.store)
    yield ray_local
    mlflow.set_tracking_uri(None)


def _cfg(dag, *extra: str):
    return load_config(REPO / "configs/quickstart.yaml", [*dag.overrides, *extra])


def _checkpoints(cfg) -> list[Path]:
    return sorted(Path(cfg.run.checkpoint_root).rglob("checkpoint_*"))


def _grid_png(console: str) -> Path:
    """The sample grid a run's closing summary names."""
    return Path(re.search(r"\(grid: (\S+grid\.png)\)", console).group(1))


def _lines(console: str, pattern: str) -> list[str]:
    return [line for line in console.splitlines() if re.search(pattern, line)]


def test_console_has_progress_and_one_summary_per_stage_and_no_ray_dumps_or_control_codes(dag):
    console = dag.console
    unexpected = [line for line in console.splitlines() if line.strip() and not any(re.match(p, line) for p in CONSOLE_LINES)]
    assert not unexpected, unexpected[:5]
    assert "\x1b" not in console, [line for line in console.splitlines() if "\x1b" in line][:3]
    assert "\r" not in console
    for noise in RAY_NOISE:
        assert noise not in console, _lines(console, re.escape(noise))[:3]
    assert not _lines(console, RAY_CORE_RECORD) and not _lines(console, r" E \d+ \d+\] ")
    for stage in STAGES:
        assert len(_lines(console, rf"\[{stage}\] done\b")) == 1, (stage, _lines(console, rf"\[{stage}\]"))
    # Progress where the stage has a loop: shards written, training steps (rank 0 only), images sampled.
    shards = _lines(console, r"\[prepare\] shard \d+/3 ")
    assert len(shards) == 3 and all(re.search(r"images/s \S+  samples \d+/96  ETA \S+", s) for s in shards), shards
    encoded = _lines(console, r"^\[encode\] images \d+/96 ")
    assert encoded and all(re.search(r"images/s \S+  ETA \S+", s) for s in encoded), encoded
    for stage in ("stage_a", "stage_b"):
        steps = _lines(console, rf"\[{stage}\] step \d+/4 ")
        assert steps and all(re.search(r"loss \S+  images/s \S+  data-wait \d+%  ETA \S+", s) for s in steps), steps
        assert steps[-1].rstrip().split(f"[{stage}] ")[1].startswith("step 4/4")
    assert _lines(console, r"\[sample\] images 4/4\b")  # two prompts x two samples, in one batch of 64
    # ... and the DAG's own line per stage: what it decided and the MLflow run.
    for stage in STAGES:
        assert len(_lines(console, rf"^\[{stage}\] ran +\d")) == 1


def test_every_stage_run_is_a_child_of_one_pipeline_run_that_names_what_it_consumed(dag):
    runs, client = dag.runs, dag.client
    parent_id = runs["pipeline"].info.run_id
    for stage in STAGES:
        assert runs[stage].info.status == "FINISHED"
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent_id
    ids = {s: runs[s].info.run_id for s in STAGES}
    upstream = {s: runs[s].data.tags["upstream_run_ids"] for s in STAGES}
    assert upstream["stage_a"] == ids["prepare"] and upstream["encode"] == ids["stage_a"]
    assert upstream["stage_b"] == f"{ids['encode']},{ids['stage_a']}" and upstream["sample"] == ids["stage_b"]
    # Walk back from the samples to the dataset digest through the tags alone.
    run_id = ids["sample"]
    while client.get_run(run_id).data.tags["stage"] != "prepare":
        run_id = client.get_run(run_id).data.tags["upstream_run_ids"].split(",")[0]
    manifest = json.loads((dag.tmp / "data" / "mnist" / "manifest.json").read_text())
    assert client.get_run(run_id).data.tags["dataset_digest"] == manifest["digest"]
    assert runs["stage_b"].data.tags["latents_uri"] == runs["encode"].data.tags["latents_uri"]

    # The parent run's summary: a table over every stage plus the reconstruction and sample grids.
    summary = json.loads(Path(client.download_artifacts(parent_id, "summary.json", str(dag.tmp))).read_text())
    assert [row["stage"] for row in summary["stages"]] == list(STAGES)
    assert {a.path for a in client.list_artifacts(parent_id, "summary")} == {
        "summary/holdout_final.png", "summary/grid.png"}
    assert "stage_a/eval/psnr" in runs["pipeline"].data.metrics
    samples = _grid_png(dag.console).parent
    assert (samples / "grid.png").is_file() and len(list(samples.glob("p*.png"))) == 4


def test_the_sample_grid_of_a_grey_dataset_is_grey(dag):
    grid = _grid_png(dag.console)
    rgb = np.asarray(Image.open(grid).convert("RGB")).astype(int)
    assert rgb.std() > 0  # not a blank image
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_plan_reuses_everything_after_a_run_and_explains_a_changed_field(dag):
    rc, out = _run(["pipelines/run.py", *dag.args, "--plan"], dag.env, dag.tmp / "plan.log", timeout=300)
    assert rc == 0, out
    assert "[prepare] skip" in out
    for stage in STAGES[1:]:
        assert f"[{stage}] reuse run {dag.runs[stage].info.run_id}" in out

    rc, out = _run(["pipelines/run.py", *dag.args, "--set=stage_b.optim.lr=5e-4", "--plan"], dag.env,
                   dag.tmp / "plan_lr.log", timeout=300)
    assert rc == 0, out
    lr = dag.client.get_run(dag.runs["stage_b"].data.tags["mlflow.parentRunId"]).data.params["stage_b.optim.lr"]
    lines = out.splitlines()
    assert f"[encode] reuse run {dag.runs['encode'].info.run_id}" in lines
    assert "[stage_b] run" in lines
    assert f"    stage_b.optim.lr: {lr} -> 0.0005" in lines
    assert sum(line.startswith("    stage_b.") for line in lines) == 1  # only the field that changed
    assert lines[lines.index("[sample] run") + 1] == "    input changed: stage_b will run"

    rc, out = _run(["pipelines/run.py", *dag.args, "--force", "encode", "--until", "stage_b", "--plan"], dag.env,
                   dag.tmp / "plan_force.log", timeout=300)
    assert rc == 0, out
    assert "[encode] run\n    --force encode" in out and "[stage_b] run\n    --force encode" in out
    assert "[sample] stop\n    --until stage_b" in out
    # Planning changed nothing: no run was added to the store.
    experiment = dag.client.get_experiment_by_name("ldm-quickstart").experiment_id
    assert len(dag.client.search_runs([experiment])) == len(STAGES) + 1


def test_the_same_dataset_at_another_path_keeps_the_cache(dag):
    # A copied or moved project: cache keys hash the dataset's content digest, not its path.
    moved = dag.tmp / "moved" / "mnist"
    shutil.copytree(dag.tmp / "data" / "mnist", moved)
    rc, plan = _run(["pipelines/run.py", *dag.args, f"--set=data.uri={moved}", "--plan"], dag.env,
                    dag.tmp / "plan_moved.log", timeout=300)
    assert rc == 0, plan
    for stage in STAGES[1:]:
        assert f"[{stage}] reuse run {dag.runs[stage].info.run_id}" in plan.splitlines(), plan


def test_lineage_walks_from_samples_or_a_model_version_back_to_the_dataset(dag):
    sample_id = dag.runs["sample"].info.run_id
    env = {**dag.env, "MLFLOW_TRACKING_URI": dag.store}
    rc, out = _run(["pipelines/lineage.py", sample_id, "--format", "json"], env, dag.tmp / "lineage.json.log", timeout=300)
    assert rc == 0, out
    chain = json.loads(out[out.index("{"):])["chain"]
    assert [e["stage"] for e in chain] == ["sample", "stage_b", "encode", "stage_a", "prepare"]
    assert [e["run_id"] for e in chain] == [dag.runs[s].info.run_id for s in reversed(STAGES)]
    by_stage = {e["stage"]: e for e in chain}
    assert all(e["status"] == "FINISHED" for e in chain)
    unet_uri = dag.runs["stage_b"].data.tags["model_uri"]
    assert by_stage["sample"]["consumed"][0] == unet_uri and by_stage["stage_b"]["produced"] == [unet_uri]
    assert by_stage["encode"]["produced"] == [dag.runs["encode"].data.tags["latents_uri"]]
    assert by_stage["stage_b"]["consumed"][0] == dag.runs["encode"].data.tags["latents_uri"]
    assert by_stage["prepare"]["produced"] == [str(dag.tmp / "data" / "mnist")]
    assert "eval/psnr" in by_stage["stage_a"]["metrics"]

    rc, text = _run(["pipelines/lineage.py", unet_uri], env, dag.tmp / "lineage.txt.log", timeout=300)
    assert rc == 0, text
    heads = [line.split()[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert heads == ["stage_b", "encode", "stage_a", "prepare"]
    assert f"    produced  {unet_uri}" in text

    # The parent run's summary.md links the same chain.
    parent = dag.runs["sample"].data.tags["mlflow.parentRunId"]
    summary = Path(dag.client.download_artifacts(parent, "summary.md", str(dag.tmp))).read_text()
    assert f"python pipelines/lineage.py {sample_id}" in summary
    for stage in STAGES:
        assert f"| {stage} | `{dag.runs[stage].info.run_id}` | FINISHED |" in summary

    rc, out = _run(["pipelines/lineage.py", "models:/ldm-unet/99"], env, dag.tmp / "lineage.bad.log", timeout=300)
    assert rc != 0 and out.strip().splitlines()[-1].startswith("error: models:/ldm-unet/99:")


def test_a_failing_stage_ends_the_console_with_stage_run_cause_and_resume_command(dag):
    # Everything up to Stage B is reused; sampling asks for more steps than the model has timesteps and fails.
    rc, out = _run(["pipelines/run.py", *dag.args, "--set=sample.steps=1000"], dag.env, dag.tmp / "fail.log", timeout=600)
    assert rc == 1
    last = out.strip().splitlines()[-1]
    # It fails before its own MLflow run starts, so the line names the pipeline run (marked FAILED).
    failed = dag.client.search_runs([dag.client.get_experiment_by_name("ldm-quickstart").experiment_id],
                                    "tags.stage = 'pipeline' and attributes.status = 'FAILED'")
    assert len(failed) == 1
    assert last.startswith(f"[sample] FAILED  MLflow pipeline run {failed[0].info.run_id}  cause: ConfigError: ")
    assert "sample.steps=1000: more than the model's 100 diffusion timesteps" in last
    # The suggested command gets past it: the --set the cause names is dropped, the rest is reused.
    resume = last.split("  resume: ", 1)[1]
    assert resume.endswith(" --from sample") and " pipelines/run.py --config " in resume
    assert "sample.steps=1000" not in resume
    rc, out = _run(shlex.split(resume)[1:], dag.env, dag.tmp / "fail_resume.log", timeout=600)
    assert rc == 0 and "[sample] reused" in out, out[-3000:]


def test_a_second_run_reuses_every_stage_and_verbose_brings_rays_own_output_back(dag):
    # Nothing changed: every stage is a cache hit of the first run; Ray starts, nothing trains, no checkpoint is
    # added. Quiet (the first run), Ray's start-up line stayed off the console; --verbose brings it back.
    checkpoints = _checkpoints(_cfg(dag))
    rc, verbose = _run(["pipelines/run.py", *dag.args, "--verbose"], dag.env, dag.tmp / "reuse_verbose.log", timeout=600)
    assert rc == 0, verbose
    for stage in STAGES[1:]:
        assert re.search(rf"^\[{stage}\] reused +[\d.]+s  run {dag.runs[stage].info.run_id}$", verbose, re.M), verbose[-3000:]
    assert _checkpoints(_cfg(dag)) == checkpoints
    assert "\x1b" not in verbose
    assert "Started a local Ray instance" not in dag.console and "Started a local Ray instance" in verbose


def test_a_failed_train_worker_ends_the_console_with_the_stage_run_and_resume_then_plan_resumes_it(dag):
    # Stage B (its config changed) runs again; rank 0 dies at step 3, after the checkpoint of step 2, and
    # max_failures=0 ends the run.
    fail = ["--set=stage_b.train.fail_at_step=3"]
    rc, out = _run(["pipelines/run.py", *dag.args, *fail], dag.env, dag.tmp / "train_fail.log", timeout=900)
    assert rc == 1, out[-5000:]
    assert not _lines(out, RAY_CORE_RECORD), _lines(out, RAY_CORE_RECORD)[:3]
    experiment = dag.client.get_experiment_by_name("ldm-quickstart").experiment_id
    failed = dag.client.search_runs([experiment], "tags.stage = 'stage_b' and attributes.status = 'FAILED'")
    assert len(failed) == 1
    run_id = failed[0].info.run_id
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"[stage_b] FAILED  MLflow run {run_id}  cause: "), last
    resume = last.split("  resume: ", 1)[1]
    assert " pipelines/run.py --config " in resume and resume.endswith("--set=stage_b.train.fail_at_step=3 --from stage_b")

    # --from a later stage refuses at once (no Ray started), naming the command that gets past it: the same resume.
    rc, refused = _run(["pipelines/run.py", *dag.args, *fail, "--from", "sample"], dag.env, dag.tmp / "from.log", timeout=300)
    assert rc == 1 and len(refused.strip().splitlines()) == 1, refused
    assert refused.startswith("error: --from sample: stage stage_b has no finished run for this config"), refused
    assert refused.strip().endswith(f"run from it: {resume}"), refused

    rc, plan = _run(["pipelines/run.py", *dag.args, *fail, "--plan"], dag.env, dag.tmp / "plan_resume.log", timeout=300)
    assert rc == 0, plan
    lines = plan.splitlines()
    assert f"[encode] reuse run {dag.runs['encode'].info.run_id}" in lines
    assert f"[stage_b] resume run {run_id} from step 2" in lines, plan
    assert lines[lines.index("[sample] run") + 1] == "    input changed: stage_b will resume"

    rc, resumed = _run(shlex.split(resume)[1:], dag.env, dag.tmp / "train_resume.log", timeout=900)
    assert rc == 0 and "[stage_b] resumed" in resumed and "[sample] ran" in resumed, resumed[-3000:]


def test_a_driver_killed_in_stage_b_leaves_its_run_running_and_the_next_driver_resumes_that_run(dag, in_process):
    """A driver attached to the session's Ray is SIGKILLed while Stage B (a longer one: a new cache key) is between
    checkpoints: its fault hook holds a worker at step 3, after the step-2 checkpoint. The next driver reuses the
    finished stages, closes the dead driver's pipeline run as KILLED and continues Stage B in the same MLflow run from
    step 2; Adam's own step counter says no update was applied twice or lost."""
    extra = ["stage_b.train.max_steps=6", "stage_b.train.fail_at_step=3"]
    cfg = _cfg(dag, *extra)
    markers = set(Path(cfg.run.checkpoint_root).glob("*-stage_b/.fault_injected"))  # the failed-worker test's
    env = {**dag.env, "RAY_ADDRESS": in_process.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    log_path = dag.tmp / "killed.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen([sys.executable, "pipelines/run.py", *dag.args, *[f"--set={o}" for o in extra]],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not set(Path(cfg.run.checkpoint_root).glob("*-stage_b/.fault_injected")) - markers:
            assert driver.poll() is None, f"the driver exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"Stage B never reached the fault hook:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        time.sleep(2.0)  # inside the hook's grace period: the step-2 checkpoint is registered, the worker still alive
        os.killpg(driver.pid, signal.SIGKILL)  # not SIGTERM: a driver told to stop closes its runs itself
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    killed = log_path.read_text()
    assert "[stage_b] running" in killed and "[stage_b] ran" not in killed, killed[-3000:]
    experiment = dag.client.get_experiment_by_name("ldm-quickstart").experiment_id
    interrupted = dag.client.search_runs([experiment], "tags.stage = 'stage_b' and attributes.status = 'RUNNING'")
    assert len(interrupted) == 1  # its driver died without a word
    dead_parent = interrupted[0].data.tags["mlflow.parentRunId"]
    assert dag.client.get_run(dead_parent).info.status == "RUNNING"

    again = pipeline.run_pipeline(cfg)
    assert [again[s].status for s in STAGES] == ["skipped", "reused", "reused", "resumed", "ran"]
    assert again["stage_b"].run_id == interrupted[0].info.run_id
    assert dag.client.get_run(dead_parent).info.status == "KILLED"
    run = dag.client.get_run(again["stage_b"].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] != dead_parent
    assert [m.value for m in dag.client.get_metric_history(run.info.run_id, "train/resumed_from_step")] == [2.0]
    ckpt = Path(run.data.tags["checkpoint"])
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 6
    assert {float(v) for k, v in load_file(str(ckpt / "opt.safetensors")).items() if k.endswith(".step")} == {6.0}


def test_force_reruns_a_cached_stage_afresh_and_from_takes_the_stages_before_it_from_the_cache(dag, in_process):
    cfg = _cfg(dag)
    experiment = dag.client.get_experiment_by_name("ldm-quickstart").experiment_id
    earlier = {r.info.run_id for r in dag.client.search_runs([experiment], "tags.stage = 'stage_b'")}
    # --force S reruns S (from scratch, under a fresh Ray Train name) even though it is cached; --until stops.
    forced = pipeline.run_pipeline(cfg, force="stage_b", until="stage_b")
    assert list(forced) == list(STAGES[:4]) and forced["stage_b"].status == "ran"
    assert forced["stage_b"].run_id not in earlier
    assert "train/resumed_from_step" not in dag.client.get_run(forced["stage_b"].run_id).data.metrics

    # --from S takes the stages before S from the cache only: a changed Stage A setting has no cached run.
    with pytest.raises(RuntimeError, match="--from stage_b: stage stage_a has no finished run"):
        pipeline.run_pipeline(_cfg(dag, "stage_a.optim.lr=5e-4"), from_stage="stage_b")
    # The newest finished run of a key is the one reused (the forced stage_b), and a stage is reused only from a
    # run that consumed the very upstream runs chosen now: the first samples came from the older stage_b.
    started = pipeline.run_pipeline(cfg, from_stage="sample")
    assert started["stage_b"].status == "reused" and started["stage_b"].run_id == forced["stage_b"].run_id
    assert started["sample"].status == "ran"
    assert dag.client.get_run(started["sample"].run_id).data.tags["upstream_run_ids"] == forced["stage_b"].run_id


def test_a_new_store_over_the_same_outputs_adopts_stage_a_and_trains_the_rest_then_clean_removes_only_its_own(
        dag, in_process, capsys, monkeypatch):
    """A new MLflow store over the same outputs/ (a deleted store, a team server): a complete result with its own
    lineage. Stage A adopts its checkpoint folder (same config, same dataset: no step runs) and says so; encode runs
    again, so Stage B's upstream runs are new: it trains fresh in its own folder, never resuming the one trained on
    the first store's latents."""
    cfg = _cfg(dag)  # (MLFLOW_TRACKING_URI wins over the config's store)
    mlflow.set_tracking_uri(None)  # (before the variable: MLflow 3 unsets MLFLOW_TRACKING_URI here)
    monkeypatch.chdir(dag.tmp)  # as users type it: a path relative to where they run (the workers run elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    capsys.readouterr()
    elsewhere = pipeline.run_pipeline(cfg)
    assert [elsewhere[s].status for s in STAGES] == ["skipped", "ran", "ran", "ran", "ran"]
    assert "[stage_a] adopting checkpoint " in capsys.readouterr().out
    other = MlflowClient(f"sqlite:///{dag.tmp / 'elsewhere.db'}")
    runs = {s: other.get_run(elsewhere[s].run_id) for s in STAGES[1:]}  # (a skipped prepare makes no run)
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert runs["stage_b"].data.tags["upstream_run_ids"] == f"{elsewhere['encode'].run_id},{elsewhere['stage_a'].run_id}"
    first = dag.runs
    assert runs["stage_b"].data.tags["latents_uri"] == elsewhere["encode"].outputs["latents_uri"] != first["encode"].data.tags["latents_uri"]
    assert runs["stage_a"].data.tags["ray_train_name"] == first["stage_a"].data.tags["ray_train_name"]  # adopted
    for key in ("eval/psnr", "eval/ssim", "final/scale_factor"):  # the adopted run shows the result it publishes
        assert runs["stage_a"].data.metrics[key] == pytest.approx(first["stage_a"].data.metrics[key])
    assert runs["stage_a"].data.tags["lpips_backbone"] == first["stage_a"].data.tags["lpips_backbone"]
    assert runs["stage_b"].data.tags["ray_train_name"] != first["stage_b"].data.tags["ray_train_name"]  # its own folder
    assert "train/resumed_from_step" not in runs["stage_b"].data.metrics

    # --clean stage_b removes the folders of stage_b and sample that only this store points at, and keeps those
    # that the first store's runs still point at; this store's runs of those stages are no longer reused.
    assert pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"),
                          *[f"--set={o}" for o in dag.overrides], "--clean", "stage_b"]) == {}
    out = capsys.readouterr().out
    ours = [f"{cfg.run.checkpoint_root}/{runs['stage_b'].data.tags['ray_train_name']}", elsewhere["sample"].outputs["out_dir"]]
    theirs = [f"{cfg.run.checkpoint_root}/{first['stage_b'].data.tags['ray_train_name']}", str(_grid_png(dag.console).parent)]
    for folder in ours:
        assert f"removed  {folder}" in out and not Path(folder).exists(), out
    for folder in theirs:
        assert f"kept     {folder}: run " in out and Path(folder).is_dir(), out
    assert "cache_key" not in other.get_run(elsewhere["stage_b"].run_id).data.tags
    assert "cache_key" in other.get_run(elsewhere["encode"].run_id).data.tags


def test_config_errors_stop_the_pipeline_before_any_stage(tmp_path):
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"), "--set", "stage_a.train.max_stepz=3"])
    assert "stage_a.train.max_stepz" in str(e.value)
    cfg = load_config(REPO / "configs/quickstart.yaml", tiny_overrides(tmp_path, str(tmp_path / "data" / "mnist")))
    with pytest.raises(ConfigError, match="--until"):
        pipeline.run_pipeline(cfg, until="stage_z")
    assert not (tmp_path / "data").exists()


def test_the_mlflow_ui_as_printed_shows_the_stage_runs_a_metric_chart_and_the_sample_grid(dag):
    ui_line, open_line = [line.strip() for line in dag.console.splitlines()
                          if line.strip().startswith(("MLflow:", "then open http"))]
    command = shlex.split(ui_line.removeprefix("MLflow:"))
    assert command[1:4] == ["ui", "--workers", "1"]
    port = free_port()
    ui = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, timeout=600, proc=ui)
        experiment = dag.client.get_experiment_by_name("ldm-quickstart")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        url = open_line.removeprefix("then open ").replace(":5000/", f":{port}/")
        pipeline_run = dag.client.get_run(dag.runs["prepare"].data.tags["mlflow.parentRunId"])
        # A real browser, waited on in real time: the UI fetches and draws asynchronously, and on a loaded machine
        # (CI) a chart came after 37 s; Chromium's --virtual-time-budget dump once raced past it three times in a row.
        browser = Chromium(dag.tmp / "chromium")
        try:
            runs = browser.dom(url, wait_for=pipeline_run.info.run_name)
            assert pipeline_run.info.run_name in runs, "the experiment page does not list the pipeline run"  # (stages nest in it)
            base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs"
            for stage in STAGES:
                page = browser.dom(f"{base}/{dag.runs[stage].info.run_id}?workflowType=machine_learning",
                                   wait_for=dag.runs[stage].info.run_name)
                assert dag.runs[stage].info.run_name in page, f"the {stage} run's page does not show it"
            chart = browser.dom(f"{base}/{dag.runs['stage_a'].info.run_id}/model-metrics?workflowType=machine_learning",
                                wait_for="js-plotly-plot")
            assert "js-plotly-plot" in chart, "no metric chart on Stage A's metrics page"
            grid = browser.dom(f"{base}/{dag.runs['sample'].info.run_id}/artifacts/samples/grid.png", wait_for='src="blob:')
            assert re.search(r'<img alt="samples/grid.png" src="blob:', grid), "the sample grid is not shown"
        finally:
            browser.close()
    finally:
        stop_process_group(ui)
    for stage in STAGES:
        assert dag.runs[stage].data.tags.get("mlflow.note.content"), f"the {stage} run has no description"
    assert dag.client.get_registered_model("ldm-unet").description
