"""The alpha search, split by process: `driver` (run_search, on the driver), `experiment` (its Tune experiment and
MLflow parent run), `pool` (the trial processes and Tune's light proxy trials), `trial` (what a trial process
evaluates), `space` (space files), `searcher` (the Optuna searcher), `outcome` (what a finished search writes and
registers); uipe.results holds TrialResult, the record between them. Nothing is re-exported here, so a trial worker
imports no driver code."""
