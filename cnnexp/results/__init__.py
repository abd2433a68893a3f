"""What a run leaves on disk and how it is read back: the format every later stage shares.

    files.py      the names of a run directory's and a sweep directory's files
    metrics.py    metrics.csv: written an epoch at a time, read back as far as it can be
    record.py     run.json: what a run is and how it ended
    objective.py  the number that judges a run, and the epoch a run selects

The training loop writes these, the figures, sweep summaries, searches,
trackers and `cnnexp.load_run` read them; none of them imports a later stage.
"""
