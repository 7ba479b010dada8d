"""Statistics of finished experiments (read from the output folder; no study code needed).

``analysis.summary``: clustered bootstrap intervals, Fisher tests, A/B mask overlap,
``write_summary(out_dir)``.
"""
