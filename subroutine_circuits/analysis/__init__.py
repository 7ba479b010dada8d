"""Statistics of finished experiments (read from the output folder; no study code needed).

``analysis.summary``: the summary tables and A/B mask overlap, ``write_summary(out_dir)``;
``analysis.inference``: run verdicts, base-model level inference (exact permutation tests, GEE,
Holm), small-sample intervals and mask-vs-patching agreement with nulls.
"""
