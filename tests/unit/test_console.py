"""launcher/console.py without a Ray: the driver's filter of worker lines, the waiting line, the embedded env."""

import os

from launcher import console


def _batch(pid, lines, is_err=True):
    return {"pid": pid, "is_err": is_err, "lines": lines, "actor_name": "RayTrainWorker", "ip": "10.0.0.1",
            "localhost": "10.0.0.1"}


def test_only_rank_0_lines_after_its_mark_and_any_ranks_error(capsys):
    show = console.WorkerLines()
    show(_batch(11, ["Setting up process group for: env:// [rank=0, world_size=2]",  # Ray Train's, before ours
                     console.RANK_MARK.format(0), "step=1 loss=5.9",
                     "[2026-11-30 04:55:48,656 E 1 2] core_worker.cc:2465: Actor with class name ..."]))
    show(_batch(22, [console.RANK_MARK.format(1), "rank 1 says hello", console.ERROR_BEGIN, "Traceback (most",
                     "ValueError: boom", console.ERROR_END, console.DONE_MARK]))
    show(_batch(33, ["(TrainController) Requesting resources: {'CPU': 1} * 2"]))  # no mark: never shown
    show(_batch(11, ["step=2 loss=5.8", console.DONE_MARK, "Error in training function: ..."]))
    show(_batch(11, ["rank 0 on stdout"], is_err=False))  # stdout's own mark has not come yet
    show(_batch(11, [console.RANK_MARK.format(0), "rank 0 on stdout"], is_err=False))
    show(_batch(44, [console.RANK_MARK.format(2), console.ERROR_BEGIN, "Traceback (most", "ValueError: boom",
                     console.ERROR_END]))  # the same error on another rank: one line
    out, err = capsys.readouterr()
    assert err.splitlines() == ["step=1 loss=5.9", "(rank 1 pid=22) Traceback (most",
                                "(rank 1 pid=22) ValueError: boom", "step=2 loss=5.8",
                                "(rank 2 pid=44) ValueError: boom (as above)"]
    assert out.splitlines() == ["rank 0 on stdout"]


def test_verbose_printer_passes_everything_but_our_marks():
    seen = []
    handle = console._without_marks(lambda data: seen.extend(data["lines"]))
    handle(_batch(1, [console.RANK_MARK.format(3), "Ray's line", console.ERROR_BEGIN, "x", console.ERROR_END,
                      console.DONE_MARK]))
    handle(_batch(1, [console.DONE_MARK]))
    assert seen == ["Ray's line", "x"]


def test_waiting_text():
    bundle = {"CPU": 1.0}
    assert console.waiting_text([bundle, bundle], {"CPU": 1.0}, {"CPU": 1.0}) == \
        "waiting for 2 workers x 1 CPU; the cluster has 1 CPU free (1 in all)"
    gpu = {"CPU": 2.0, "GPU": 1.0}
    assert console.waiting_text([gpu] * 4, {"CPU": 30.0}, {"CPU": 32.0, "GPU": 2.0}) == \
        "waiting for 4 workers x 2 CPUs + 1 GPU; the cluster has 30 CPUs free (32 in all), 0 GPUs free (2 in all)"


def test_embedded_env_is_set_around_init_only(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # a user's cluster: not for the embedded Ray's processes
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with console.own_ray_env(8266):
        assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8266" and "RAY_ADDRESS" not in os.environ
    assert os.environ["RAY_ADDRESS"] == "10.1.2.3:6379" and "RAY_API_SERVER_ADDRESS" not in os.environ
