"""The driver's trial-run logger: each epoch logged once, and the report of the epoch a multi-worker
trial continued from (``restored/`` keys) logged when an interruption kept it from the driver."""

from __future__ import annotations

import mlflow

from detr.search.trial_runs import TrialRunLogger


class Trial:  # what the logger reads of a Ray trial
    trial_id = "t0"


def logger_with_run(tmp_path, logged_up_to: int) -> tuple[TrialRunLogger, mlflow.MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("trials", artifact_location=str(tmp_path / "a"))).info.run_id
    for epoch in range(1, logged_up_to + 1):
        client.log_metric(run_id, "epoch", epoch, step=epoch)
    logger = TrialRunLogger(tracking_uri=uri, experiment_name="trials", save_artifact=False)
    logger._trial_runs, logger._logged_epochs = {Trial: run_id}, {Trial: logged_up_to}
    return logger, client, run_id


def report(epoch: int, loss: float, **extra) -> dict:
    return {"epoch": epoch, "train/loss_mean": loss, "training_iteration": 1, "worker/pid": 7, **extra}


def test_a_restored_epoch_the_driver_never_saw_is_logged_at_its_step(tmp_path):
    # Epochs 1-2 logged; epoch 3's report was lost to the interruption, the trial continued from
    # epoch 3's checkpoint and its first report (epoch 4) carries epoch 3's.
    logger, client, run_id = logger_with_run(tmp_path, logged_up_to=2)
    logger.log_trial_result(1, Trial, report(4, 0.4, **{"restored/epoch": 3, "restored/train/loss_mean": 0.5}))
    logger.log_trial_result(2, Trial, report(5, 0.3))
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss_mean")}
    assert history == {3: 0.5, 4: 0.4, 5: 0.3}
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1, 2, 3, 4, 5]
    metrics = client.get_run(run_id).data.metrics
    assert not any(k.startswith(("restored/", "worker/")) for k in metrics), metrics


def test_a_restored_epoch_already_logged_is_not_logged_again(tmp_path):
    # A worker restart within a running search: the driver had logged the epoch it continues from.
    logger, client, run_id = logger_with_run(tmp_path, logged_up_to=3)
    logger.log_trial_result(1, Trial, report(4, 0.4, **{"restored/epoch": 3, "restored/train/loss_mean": 0.9}))
    logger.log_trial_result(2, Trial, report(4, 0.4))  # an epoch reported twice: the first stays
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss_mean")] == [(4, 0.4)]
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1, 2, 3, 4]
