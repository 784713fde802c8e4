"""The search over LD3's hyperparameters: the space, the trial, the Tune set-up (Optuna + batched halving)."""
