"""Dassl/CoOp trainers: thin adapters over algorithms/ (see trainers/dassl_adapter.py)."""
