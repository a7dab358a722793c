"""User-facing errors and the process exit codes of the contract (DESIGN.md section 1)."""

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad job file, prompt file, model files or layout; nothing was run
EXIT_RESUMABLE = 75  # stopped early (signal, walltime); rerunning the job continues it


class UserError(Exception):
    """A mistake in what the user gave us. The CLI prints str(error) as one line, no traceback.

    The message names the file (and line or key) and says what is wrong with it.
    """


def one_line(error):
    """A library's exception text folded onto one line, to quote inside a UserError."""
    return " ".join(str(error).split()) or type(error).__name__
