from pneumonia_cnn.training import make_config, train


def tiny(small_root, cache_dir, out, tracker):
    return make_config("tutorial", data=str(small_root), out=str(out), epochs=2, size=40, batch_size=16,
                       cache_dir=str(cache_dir), progress=False, min_val_images=10, ood=False, evaluate_test=False,
                       tracker=tracker)


def test_mlflow_run_reads_back_with_mlflow_client(small_root, cache_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from pneumonia_cnn.tracking import local_mlflow_uri
    summary = train(tiny(small_root, cache_dir, tmp_path / "run", "mlflow"))
    client = MlflowClient(tracking_uri=local_mlflow_uri(tmp_path / "run" / "mlflow"))
    experiment = client.get_experiment_by_name("pneumonia-cnn")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == summary["run_id"]
    run = runs[0]
    assert run.data.params["model"] == "seed" and run.data.params["epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "history.csv", "config.json"} <= artifacts


def test_tensorboard_events_read_back(small_root, cache_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    summary = train(tiny(small_root, cache_dir, tmp_path / "run", "tensorboard"))
    accumulator = EventAccumulator(str(tmp_path / "run" / "tensorboard" / summary["run_id"]))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train_loss")] == [1, 2]
    assert "curves" in accumulator.Tags()["images"]


def test_a_tracking_store_that_cannot_be_opened_is_one_line_and_leaves_no_run_folder(small_root, cache_dir, tmp_path,
                                                                                      capsys):
    """`--tracking-uri /proc/x` ended in MLflow's raw FileNotFoundError, and the run folder it left (config.json
    and the lock) made the rerun meet "a folder that holds a run"."""
    from pneumonia_cnn.cli import main
    out = tmp_path / "new" / "run"
    argv = ["train", "--data", str(small_root), "--out", str(out), "--preset", "tutorial", "--epochs", "1",
            "--size", "40", "--cache-dir", str(cache_dir), "--min-val-images", "10", "--no-progress"]
    assert main([*argv, "--tracker", "mlflow", "--tracking-uri", "/proc/x"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --tracking-uri /proc/x: cannot start the mlflow run (FileNotFoundError: [Errno 2] No such file or " \
        "directory: '/proc/x')"
    assert not (tmp_path / "new").exists()
    assert main([*argv, "--no-ood"]) == 0 and (out / "best.pt").exists()  # the same --out, at once
