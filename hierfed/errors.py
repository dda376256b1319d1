"""The one exception type for bad input: the CLI prints it as one line and exits 2."""


class HierfedError(Exception):
    """A user-facing error: bad topology, bad run config, bad data, mismatched world size.

    The message is a single line that names the offending file/field and why it is wrong.
    """

    exit_code = 2
