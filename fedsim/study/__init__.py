"""The study runner behind ``python -m fedsim.experiments``: the paper's comparisons over seeds.

plan      which variants, which train.py runs, and which of them are the same run
runner    runs train.py (under torchrun on several ranks), one run or --jobs runs at a time
stats     Student t intervals and paired t-tests over seeds (scipy.stats)
results   results.csv, results.md and results.png from the runs' final.json
"""
