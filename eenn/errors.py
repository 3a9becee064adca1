"""The one exception type eenn raises for bad input: the CLI prints its message alone."""


class EENNError(ValueError):
    """Bad input (config key, file, data): the message is one sentence that names it."""
