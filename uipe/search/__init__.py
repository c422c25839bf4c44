"""The alpha search, split by process: `driver` (run_search, on the driver), `pool` (the trial
processes and Tune's light proxy trials), `trial` (what a trial process evaluates),
`space` (space files), `searcher` (the Optuna searcher), `result` (TrialResult, the record between them),
`outcome` (what a finished search writes and registers). Nothing is re-exported here, so a trial worker imports no
driver code."""
