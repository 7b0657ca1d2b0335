"""Plumbing every part of the harness shares: repository paths (`paths`), the
CLIPBENCH_* environment variables (`env`), atomic writes and record reading (`files`),
how entry points fail and the readers of the harness's own YAML (`cli`).
Imports nothing heavy and nothing from the rest of the harness."""
