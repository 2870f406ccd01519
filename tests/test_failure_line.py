"""The pieces of a failed pipeline's last line and of `--plan`'s reasons that need no Ray: the cause, the resume
command and the dotted config diff. (tests/test_pipeline.py checks them end to end on a real run.)"""

from __future__ import annotations

import sys

from pipelines.dag.plan import config_diff
from pipelines.dag.executor import StageFailure, failure_cause, resume_command


def test_the_cause_is_the_innermost_error_on_one_line_without_colour_codes():
    try:
        try:
            raise ValueError("first line\nsecond line")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as e:
        assert failure_cause(e) == "ValueError: first line"

    remote = RuntimeError("\x1b[36mray::RayTrainWorker.run()\x1b[39m (pid=1, ip=x)\n  File \"loop.py\", line 3\n"
                          "pipelines.train.rank.NonFiniteLossError: 20 consecutive steps had a non-finite loss")
    assert failure_cause(remote) == "pipelines.train.rank.NonFiniteLossError: 20 consecutive steps had a non-finite loss"

    class WorkerGroupError(RuntimeError):  # the shape of Ray Train's error: one exception per failed rank
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    assert failure_cause(WorkerGroupError({1: MemoryError("rank 1 ran out")})) == "MemoryError: rank 1 ran out"

    class ControllerError(RuntimeError):  # Ray Train's controller failure: the message is on its next line
        def __init__(self, failure):
            super().__init__("Training failed due to controller error:\n" + str(failure))
            self.controller_failure = failure

    assert failure_cause(ControllerError(OSError("node ran low on memory\nmore"))) == "OSError: node ran low on memory"
    assert failure_cause(RuntimeError("failed:\nbecause of this")) == "RuntimeError: failed: because of this"
    assert len(failure_cause(ValueError("x" * 1000))) == 300


def test_resume_goes_on_from_the_failed_stage_with_the_same_settings(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/somewhere/else/bin/python")
    argv = ["--config", "c.yaml", "--set", "a=1", "--force", "stage_a", "--from=prepare", "--until", "sample"]
    assert resume_command(argv, "stage_b", "stage_a", "prepare") == \
        "/somewhere/else/bin/python pipelines/run.py --config c.yaml --set a=1 --until sample --from stage_b"
    # The forced stage itself failed: force it again (its fresh Ray Train name cannot be resumed), no --from.
    assert resume_command(["--config", "c.yaml", "--force", "stage_b"], "stage_b", "stage_b", "prepare").endswith(
        "pipelines/run.py --config c.yaml --force stage_b")
    assert resume_command(["--set", "x=a b"], "prepare", None, "prepare").endswith("pipelines/run.py --set 'x=a b'")
    # A config error fails again with the same settings: the --set in effect for the field it names is dropped (an
    # earlier one for the same field then applies).
    argv = ["--config", "c.yaml", "--set", "sample.steps=3", "--set=sample.steps=1000", "--set", "sample.num_per_prompt=2"]
    assert resume_command(argv, "sample", None, "prepare", "ConfigError: sample.steps=1000: more than 100").endswith(
        "pipelines/run.py --config c.yaml --set sample.steps=3 --set sample.num_per_prompt=2 --from sample")
    assert resume_command(argv[:2] + argv[4:], "sample", None, "prepare", "ConfigError: sample.steps=1000: x").endswith(
        "pipelines/run.py --config c.yaml --set sample.num_per_prompt=2 --from sample")
    assert resume_command(["--set=sample.steps=1000"], "sample", None, "prepare", "OSError: sample.steps=1000").endswith(
        "--set=sample.steps=1000 --from sample")
    line = StageFailure("encode", None, "0123", "OSError: disk full").line("python pipelines/run.py --from encode")
    assert line == ("[encode] FAILED  MLflow pipeline run 0123  cause: OSError: disk full  "
                    "resume: python pipelines/run.py --from encode")


def test_config_diff_names_each_changed_dotted_path_old_to_new():
    old = {"stage_b.optim.lr": "0.001", "stage_b.batch_size": "128", "run.seed": "0"}
    new = {"stage_b.optim.lr": "0.0005", "stage_b.batch_size": "128", "run.seed": "0", "stage_b.ema": "0.999"}
    assert config_diff(old, new) == ["stage_b.ema: (not set) -> 0.999", "stage_b.optim.lr: 0.001 -> 0.0005"]
    assert config_diff(new, new) == []
    # a field the dump leaves out at its default (split_digits turned off again) is named too, within the sections
    on = {"encode.text_encoder.split_digits": "True", "encode.text_encoder.max_length": "16", "sample.seed": "1"}
    off = {"encode.text_encoder.max_length": "16"}
    assert config_diff(on, off, ("encode.text_encoder",)) == ["encode.text_encoder.split_digits: True -> (default)"]
