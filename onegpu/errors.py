"""One error type for bad user input: it names the problem and the fix."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints it without a traceback.

    Always say what is wrong *and* what to do about it, e.g.
    ``UserError("recipe source 'dolly' has weight -1", fix="use a weight > 0")``.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
