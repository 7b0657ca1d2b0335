"""What every method shares: the contract (`method`), its discovery (`registry`),
hyperparameter declarations (`hparams`), the held-out selection protocol (`selection`),
the frozen-feature cache (`feature_cache`) and class names (`classnames`)."""
