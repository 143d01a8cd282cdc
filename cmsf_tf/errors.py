"""The one base of every error the user causes and can mend: a bad flag, a missing data set, a damaged
checkpoint, a foreign run directory.

Its message is the sentence the user sees. Each command line catches `UserError` once, prints
`error: <message>` and exits 2; any other exception is a bug and keeps its traceback. Modules raise
their own subclass (DataError, LabelError, RunDirError, EncoderError, ConvertError, WeightsError) so that
library callers can tell them apart, and nobody translates one into another.
"""


class UserError(Exception):
    """Bad input from the user, said in one sentence: printed as `error: <message>`, exit code 2."""


def exit_on_user_error(main):
    """`main(argv)` wrapped for absl's app.run: a UserError becomes `error: <message>` on stderr and exit 2."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapped
