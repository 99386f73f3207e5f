"""The steps of a stage, one module each, as functions over a `mates.context.Context`:
`training` (train, checkpoint, cooldown evaluation, export), `probing` (the oracle),
`fitting` (the influence model), `scoring` (the next pool, by shards), `selecting` (pools
and selections, the baselines, the quality gate), `sharing` (an arm's stage 0 lent to
another). `mates.run.Run` calls them in the algorithm's order."""
