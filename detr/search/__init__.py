"""Hyperparameter search: Ray Tune with the ASHA scheduler, recorded in MLflow.

Modules:
    space    search spaces: dotted config keys -> distributions, read from YAML and checked against the
             config schema (no Ray, no MLflow)
    tune     ``run_search``: the driver (Ray Tune, ASHA, the sweep)
    runs     the MLflow side: the sweep run, the trials' child runs, what is recorded when it ends

A search varies the config, so it sits above the config boundary (``detr.run``): each trial is a
``train_from_config`` of the base config plus the trial's values.
"""
