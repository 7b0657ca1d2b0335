"""Plumbing every part of the harness shares: repository paths (`paths`), the
CLIPBENCH_* environment variables (`env`), atomic writes and record reading (`files`).
Imports nothing heavy and nothing from the rest of the harness."""
