"""User-facing errors.

A `UserError` is bad input the user can fix (a path, a config value, a malformed row). The CLI
prints its message as one line and exits with status 2, no traceback; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" (granite_train/train/preemption.py)


class Preempted(Exception):
    """The run stopped on a preemption signal after writing a checkpoint; the same command
    resumes from it. The CLI exits with `exit_code`."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, signal_name: str, step: int, checkpoint: object) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}; "
                         f"run the same command again to resume")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
