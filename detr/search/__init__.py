"""Hyperparameter search: Ray Tune with the ASHA scheduler, recorded in MLflow.

Modules:
    space    search spaces: dotted config keys -> distributions, read from YAML and checked against the
             config schema (no Ray, no MLflow)
    tune     ``run_search``: the driver (Ray Tune, ASHA, the sweep)
    runs     the MLflow side: the sweep run, the trials' child runs, what is recorded when it ends
    trial    a one-process trial: its config, its training, its reports to Tune
    trial_workers  a trial on several Ray Train workers (a TorchTrainer per trial), its restarts
    ray_train  ``detr train --workers N``: data-parallel training in a Ray Train TorchTrainer
    cluster  Ray for a search or a training: this machine's or a cluster's, and the checks made before
             anything starts there (resources, storage, tracking store, CUDA on GPU nodes)

A search varies the config, so it sits above the config boundary (``detr.run``): each trial is a
``train_from_config`` of the base config plus the trial's values.
"""
