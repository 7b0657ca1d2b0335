"""Data of published protocols, each file with its source (eslami_evaluation.json: Eslami &
de Melo's evaluation, written by extract_eslami.py)."""
