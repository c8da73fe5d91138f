"""A local output_dir that the ranks do not all see (several nodes, no shared mount) is one line, on 2 gloo ranks.

Each rank is given its own folder to stand for a node-local disk (``split``); the same folder for both is a shared
mount, which passes and leaves no probe file behind.
"""

from pathlib import Path

from tests.jobs import job_dict, run_ranks


def probe(cfg, base: str) -> dict:
    """run_ranks entry: storage.check_shared on a folder of this rank's own (a node's disk), then on one folder."""
    import torch.distributed

    from distrib_ft.runtime import dist, storage
    from distrib_ft.schema import ConfigError

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    errors = []
    for out in (Path(base) / f"node{dist.rank()}", Path(base) / "shared"):
        try:
            storage.check_shared(out)
            errors.append(None)
        except ConfigError as e:
            errors.append(str(e))
    return {"errors": errors}


def test_an_output_dir_the_nodes_do_not_share_is_refused(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir)  # run_ranks hands the entry a config; the probe does not use it
    results = run_ranks(raw, 2, tmp_path, entry="tests.distributed.test_storage_gloo:probe", base=str(tmp_path))
    assert [r["errors"] for r in results] == [  # each rank names the path as it was given (on nodes: the same)
        [f"training.output_dir: {tmp_path / f'node{r}'} is not shared between the nodes of ranks 0 and 1; "
         "use a shared mount or an s3:// (gs://, hdfs://) URL", None] for r in (0, 1)]
    assert not list((tmp_path / "shared").iterdir())  # the probe is gone
