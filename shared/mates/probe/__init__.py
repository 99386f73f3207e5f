"""Oracle data influence: one AdamW step on one example, reference loss after minus before.

`I(x) = L(D_ref | θ after one step on x) − L(D_ref | θ)`; lower is more helpful.

`ExactOracle` takes the step: the weights and AdamW state are snapshotted in
memory once per checkpoint and restored bit-exactly after every probe (the
reference code reloads the checkpoint from disk for every probe; we never do).
`FirstOrderOracle` approximates it by `⟨∇L_ref, Δθ(x)⟩`, with AdamW's update
Δθ(x) computed elementwise and ∇L_ref once per checkpoint.

One module each: `oracle` (what both hold), `exact` (the snapshot and `ExactOracle`) and
`first_order` (`FirstOrderOracle`).
"""

from mates.probe.exact import ExactOracle, Snapshot, restore_snapshot, take_snapshot
from mates.probe.first_order import FirstOrderOracle
from mates.probe.first_order import _views as _views

__all__ = ["ExactOracle", "FirstOrderOracle", "Snapshot", "restore_snapshot", "take_snapshot"]
