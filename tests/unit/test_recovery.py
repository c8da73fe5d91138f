"""distrib_ft/runtime/recovery.py without a cluster: Ray Train's own error classes, built as Ray builds them."""

import json

import pytest
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import WorkerGroupError

from distrib_ft.data.formats import DataError
from distrib_ft.runtime import recovery

GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:37032: "
              "Connection reset by peer. This is typically caused by a remote worker hanging")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "3000ms for recv operation to complete")


def _death(pid: int = 4242) -> WorkerHealthCheckFailedError:
    """What Ray Train's poll records for a worker whose process was SIGKILLed (as seen on ray 2.60)."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    died = ActorDiedError(ActorDiedErrorContext(
        class_name="RayTrainWorker", actor_id=bytes(range(16)), pid=pid, node_ip_address="192.0.2.2",
        error_message="The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR"))
    return WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: ...", failure=died)


def test_a_death_is_the_reason_not_the_survivors_reset_connection():
    error = WorkerGroupError("2 workers failed", {0: RuntimeError(GLOO_RESET), 1: _death()})
    text = recovery.describe(error)
    assert text == "a worker died (rank 1, pid 4242 on 192.0.2.2; killed, out of memory, or its node lost)"
    assert isinstance(recovery.main_error(error), recovery.WorkerLost) and str(recovery.main_error(error)) == text
    assert recovery.recoverable(error)


def test_a_collective_timeout_gets_a_clear_line():
    clear = recovery.explain(RuntimeError(GLOO_TIMEOUT), 30)
    assert isinstance(clear, recovery.CollectiveTimeout)
    assert str(clear) == "a collective waited more than 30 s: a worker hangs or died (distributed.collective_timeout_s)"
    assert recovery.explain(RuntimeError("Application timeout caused pair closure"), 5) is not None
    assert recovery.explain(ValueError("data.train_files: bad"), 30) is None
    clear.__cause__ = RuntimeError(GLOO_TIMEOUT)  # raised from gloo's error in the worker
    error = WorkerGroupError("1 worker failed", {1: clear})
    assert recovery.describe(error) == str(clear) and recovery.main_error(error) is clear
    reset = WorkerGroupError("1 worker failed", {0: RuntimeError(GLOO_RESET)})
    assert recovery.describe(reset).startswith("a worker lost its connection to the others (rank 0: [/__w/")
    assert recovery.main_error(reset) is None  # the CLI reports the workers' first error


def test_an_input_error_on_a_worker_is_not_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    policy = recovery.failure_policy(FailureConfig(max_failures=2))
    bad = WorkerGroupError("1 worker failed", {0: DataError("train.jsonl: line 100: field 'output': missing"),
                                               1: RuntimeError(GLOO_RESET)})
    assert not recovery.recoverable(bad) and policy.make_decision(bad) == FailureDecision.RAISE
    died = WorkerGroupError("1 worker failed", {1: _death()})
    assert [policy.make_decision(died) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [FailureDecision.RAISE]
    bug = WorkerGroupError("1 worker failed", {0: RuntimeError("Error while deserializing header: HeaderTooLarge")})
    assert not recovery.recoverable(bug)  # it would recur on every attempt
    hung = WorkerGroupError("1 worker failed", {0: recovery.explain(RuntimeError(GLOO_TIMEOUT), 30)})
    reset = WorkerGroupError("1 worker failed", {1: RuntimeError(GLOO_RESET)})
    assert recovery.recoverable(hung) and recovery.recoverable(reset)


class _Ckpt:
    def __init__(self, step: int):
        self.name = f"step-{step}"


def test_the_attempts_of_a_run_across_restarts():
    first = recovery.Attempt(1, 3, [], "run1")
    saved = recovery.history(None, first, None, 0)  # what the checkpoint of step 2 carries
    assert saved == [{"run": "run1", "attempt": 1, "resumed_from": None, "step": 0, "error": None}]
    # attempt 2 died before writing a newer checkpoint; attempt 3 resumes from the same one
    third = recovery.Attempt(3, 3, ["a worker died (rank 1)", "a collective waited more than 30 s"], "run1")
    got = recovery.history(saved, third, _Ckpt(2), 2)
    assert [(a["attempt"], a["resumed_from"], a["step"], a["error"]) for a in got] == [
        (1, None, 0, "a worker died (rank 1)"), (2, "checkpoints/step-2", 2, "a collective waited more than 30 s"),
        (3, "checkpoints/step-2", 2, None)]
    assert recovery.resume_line(third, _Ckpt(2)) == ("attempt 3 of 3: a collective waited more than 30 s; "
                                                     "resuming from checkpoints/step-2")
    assert recovery.resume_line(recovery.Attempt(2, 3, ["x"]), None) == \
        "attempt 2 of 3: x; no complete checkpoint yet: starting again from step 0"
    # a --resume submission (another run id): the earlier submission's attempts are not this run's
    again = recovery.history(got, recovery.Attempt(1, 3, [], "run2"), _Ckpt(4), 4)
    assert again == [{"run": "run2", "attempt": 1, "resumed_from": "checkpoints/step-4", "step": 4, "error": None}]


def test_the_attempt_reaches_the_worker_and_the_driver(tmp_path, monkeypatch):
    monkeypatch.delenv(recovery.ENV, raising=False)
    assert recovery.current() == recovery.Attempt()
    recovery._set_attempt(json.dumps({"attempt": 2, "of": 3, "failures": ["a worker died"], "run": "r"}))
    assert recovery.current() == recovery.Attempt(2, 3, ["a worker died"], "r") and recovery.current().restarted
    monkeypatch.delenv(recovery.ENV)
    recovery.write_ledger(tmp_path / "attempts.json", {"attempts": 2, "of": 3, "failures": ["a worker died"]})
    assert recovery.read_ledger(tmp_path / "attempts.json") == [{"attempt": 1, "error": "a worker died"},
                                                                {"attempt": 2, "error": None}]
    assert recovery.read_ledger(tmp_path / "none.json") == []


@pytest.mark.parametrize("key, value", [("distributed.max_failures", -1), ("distributed.collective_timeout_s", 0)])
def test_the_keys_refuse_bad_values(tmp_path, key, value):
    from distrib_ft.config import ConfigError, config_from_dict

    raw = {"model": {"name_or_path": "x"}, "data": {"train_files": ["a.jsonl"]},
           "training": {"output_dir": str(tmp_path)}, "distributed": {key.split(".")[1]: value}}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw, "job.yaml")
