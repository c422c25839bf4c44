"""uipe study: UIPE against fair baselines over seeds."""
