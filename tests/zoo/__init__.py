"""The zoo sweep: every causal-LM architecture of the installed transformers x every am-* package.

`python -m tests.zoo --help`; the nox session `zoo` writes docs/support-matrix.md with it.
"""
