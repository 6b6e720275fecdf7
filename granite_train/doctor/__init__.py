"""`python -m granite_train.doctor`: what this machine can run, and whether it runs it right.

Nothing is imported here: `granite_train.doctor.interpreted` is imported by tests that must not
pay for the doctor's own imports.
"""
