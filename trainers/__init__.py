"""Dassl/CoOp trainers: thin adapters over algorithms/ (see trainers/dassl_adapter.py).
For a CoOp run, CoOp's trainers/ directory joins this package's path
(trainers/upstream_patches.py open_upstream), so its `trainers.coop` imports beside ours."""
