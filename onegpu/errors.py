"""One error type for bad user input: it names the problem and the fix."""

import difflib


class UserError(Exception):
    """Bad input or configuration. The CLI prints it without a traceback.

    Always say what is wrong *and* what to do about it, e.g.
    ``UserError("recipe source 'dolly' has weight -1", fix="use a weight > 0")``.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


def all_problems(errors: list[UserError]) -> UserError:
    """One UserError that lists every problem found, each with its fix, so a config is fixed in one pass.

    ``errors`` may themselves be such lists (they are flattened); a single problem comes back as is.
    """
    flat, seen = [], set()
    for problem in (p for err in errors for p in getattr(err, "problems", [err])):
        if (problem.problem, problem.fix) not in seen:  # two checks can find the same problem
            seen.add((problem.problem, problem.fix))
            flat.append(problem)
    if len(flat) == 1:
        return flat[0]
    listed = "\n".join(f"  - {p.problem}" + (f"\n    fix: {p.fix}" if p.fix else "") for p in flat)
    combined = UserError(f"{len(flat)} problems:\n{listed}", fix="correct all of the above (every problem found is listed)")
    combined.problems = flat
    return combined


class RunStopped(Exception):
    """A run stopped on request (SIGTERM) after saving its state; the CLI exits with ``exit_code``.

    ``summary`` is what the run wrote to its summary.json (``stopped_by`` says why).
    """

    def __init__(self, message: str, summary: dict, exit_code: int = 143):  # 143 = 128 + SIGTERM
        super().__init__(message)
        self.summary = summary
        self.exit_code = exit_code


def exit_code_of(error: BaseException | None) -> int:
    """The one rule for what a verb's exit code says: 0 done, 2 bad input (``UserError``), 130 interrupted,
    143 (128 + SIGTERM) or the stop's own code for a stopped run, a ``SystemExit``'s code, else 1."""
    if error is None:
        return 0
    if isinstance(error, UserError):
        return 2
    if isinstance(error, RunStopped):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    return 1


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """``"did you mean --lora_r? "`` for the choice closest to ``word`` (difflib), else ``""``.

    A choice whose last dotted part is ``word`` counts as closest (``nf4`` -> ``bnb.nf4``).
    """
    choices = [str(c) for c in choices]
    close = [c for c in choices if c.rsplit(".", 1)[-1] == word] or difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
