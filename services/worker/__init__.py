"""The workers: the fit, score-shard and select tasks (`tasks`) and `mates serve worker` (`main`)."""
