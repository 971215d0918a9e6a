"""Exceptions that the command-line layer turns into one-line messages and exit status 2.

Every problem caused by the user's input (parameter file, packs, templates, FITS files, frozen models)
is raised as :class:`AnnaInputError`, whose message already names the file, the key or line, and the
offending value.  Anything else is a bug and keeps its traceback.
"""


class AnnaInputError(Exception):
    """Bad user input.  ``str(error)`` is a complete, single-line message fit to print as is."""

    def __init__(self, message, *, path=None, line=None, key=None, value=None):
        parts = []
        if path is not None:
            location = str(path)
            if line is not None:
                location += f":{line}"
            parts.append(location)
        if key is not None:
            parts.append(str(key))
        text = ": ".join(parts + [message]) if parts else message
        if value is not None:
            text += f" (got {value!r})"
        super().__init__(text)
        self.path = path
        self.line = line
        self.key = key
        self.value = value
