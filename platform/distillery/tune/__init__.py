"""Ray Tune: hyperparameter search (Optuna + ASHA) over any config key, with rung gates and placement-group cleanup."""
