"""The one error family: every problem a user can fix is a `BenchError` with a message that
names the file, the key, what was given and what would be valid. The CLI prints it on one line
and exits with status 2; nothing else is written."""

from __future__ import annotations

import difflib


class BenchError(Exception):
    """A problem the user can act on (bad suite, unknown plugin, missing data)."""


class SuiteError(BenchError):
    """The suite file is malformed or asks for something impossible."""


class UnknownPluginError(SuiteError):
    """A suite names a plugin that no installed package provides."""


class OptionError(SuiteError):
    """A plugin option is unknown, of the wrong type or out of range."""


class DataNotFoundError(BenchError):
    """A dataset's files are not where the loader looked."""


class PluginLoadError(BenchError):
    """A plugin failed to import or registered a name that is already taken."""


def did_you_mean(given: str, valid: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(given, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
