"""Many runs: sweeps, searches and clusters.

    table.py     one row per job of a sweep directory, rebuilt from disk
    summary.py   summary.csv and comparison plots (a Hydra callback and the plot command)
    search.py    an Optuna search's summary, best.txt and figures
    pruning.py   a search trial's side: report each epoch, stop when pruned
    slurm.py     the SLURM cluster as the launcher sees it

The Hydra plugins (hydra_plugins/) call into these; a single run knows
only pruning.py (its observer) and summary.py (a sweep stopped mid-job).
"""
