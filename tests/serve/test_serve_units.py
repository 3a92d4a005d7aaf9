"""The serving layer's pure parts: the job store, the ldm-serve flags and its Ray Serve config file."""
from __future__ import annotations

import time

import pytest

from ldm_engine.serve import cli
from ldm_engine.serve.jobs import JobStore


def test_job_lifecycle_progress_eta_and_result():
    store = JobStore()
    job = store.create("alice", "shapes", steps=10, n_images=2, source="jobs")
    assert store.view(job)["state"] == "queued" and store.counts()["queued"] == 1
    assert store.start([job]) == []
    time.sleep(0.01)
    assert store.progress([job], 4, 10, 0.02) == []
    view = store.view(job)
    assert view["state"] == "running" and view["step"] == 4 and view["progress"] == 0.4 and view["eta_s"] > 0
    store.finish(job, "done", result={"images": ["x"]})
    view = store.view(job)
    assert view["state"] == "done" and view["step"] == 10 and view["result"] == {"images": ["x"]}
    store.finish(job, "failed", error="late")  # a finished job stays as it ended
    assert store.view(job)["state"] == "done"
    text = store.metrics().decode()
    assert 'ldm_images_total{model="shapes"} 2.0' in text and "ldm_batch_images_count 1.0" in text


def test_cancel_queued_running_and_latest_per_caller():
    store = JobStore()
    queued = store.create("bob", "m", 5, 1, "a1111")
    assert store.cancel(queued)["state"] == "cancelled"
    assert store.start([queued]) == [queued]  # a replica that picks it up sees it was cancelled
    running = store.create("bob", "m", 5, 1, "a1111")
    other = store.create("carol", "m", 5, 1, "a1111")
    store.start([running, other])
    assert store.cancel_latest("bob")["id"] == running
    assert store.progress([running, other], 1, 5) == [running]  # answered with the next step report
    assert store.view(other)["state"] == "running"
    assert store.latest_view("carol")["id"] == other and store.latest_view("nobody") is None
    assert store.cancel("no-such-job") is None


def test_files_expire_and_old_jobs_are_dropped():
    store = JobStore(ttl_s=0.05, max_jobs=2)
    file_id = store.put_file(b"png")
    assert store.get_file(file_id) == b"png"
    ids = [store.create("u", "m", 1, 1, "jobs") for _ in range(3)]
    for i in ids:
        store.finish(i, "done")
    time.sleep(0.06)
    assert store.get_file(file_id) is None
    store.create("u", "m", 1, 1, "jobs")  # creating expires the old ones
    assert all(store.view(i) is None for i in ids)


def test_write_config_round_trips_through_ray_serves_schema(tmp_path, capsys):
    assert cli.main(["--write-config", "--port", "8001", "--max-batch-size", "4", "--api-key", "k"]) == 0
    path = tmp_path / "serve.yaml"
    path.write_text(capsys.readouterr().out)
    http, apps = cli.read_config(path)
    assert http == {"host": "127.0.0.1", "port": 8001}
    (app,) = apps
    assert app["import_path"] == "ldm_engine.serve.cli:app_builder"
    assert app["args"]["max_batch_size"] == 4 and app["args"]["api_key"] == "k"
    cli.app_builder(app["args"])  # the builder accepts what the writer wrote
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: 3\n")
    with pytest.raises(ValueError, match="not a Ray Serve config"):
        cli.read_config(bad)


def test_app_builder_and_flags_refuse_bad_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown ldm-serve application args"):
        cli.app_builder({"replicaz": 2})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        cli.app_builder({"max_batch_size": 32, "max_ongoing_requests": 8})
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    with pytest.raises(ValueError, match="two models are named"):
        cli.app_builder({"models": [{"path": str(model)}, {"path": str(model)}]})
    for argv, needle in ((["--autoscale", "3,1"], "MIN <= MAX"), (["--model", "/no/such/file"], "does not exist"),
                         (["--replicas", "2", "--autoscale", "1,2"], "not allowed with")):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(argv)
        assert needle in capsys.readouterr().err
    ns = cli.parser().parse_args(["--model", f"base={model}", "--autoscale", "1,4"])
    args = cli.args_from_flags(ns)
    assert args["models"] == [{"name": "base", "path": str(model.resolve())}] and args["autoscale"] == [1, 4]


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2-depth", "tiny-ldm-superres", "tiny-ldm-semantic",
                                    "tiny-ldm-inpaint", "tiny-ldm-bert", "tiny-ldm-layout", "tiny-ldm-vq"])
def test_replica_health_check_runs_on_every_model_kind(preset):
    """Ray's health check runs a one-step generation: it must give each task the input it needs (a depth
    map, a label map, a layout, a low-res image), or a replica of such a model would be restarted forever."""
    import threading

    from ldm_engine.loading import random_model
    from ldm_engine.pipeline import Pipeline
    from ldm_engine.serve.worker import ModelWorker

    worker = ModelWorker.__new__(ModelWorker)  # the replica's state without reading a model file
    worker.pipe, worker.lock = Pipeline(random_model(preset)), threading.Lock()
    worker.health()
