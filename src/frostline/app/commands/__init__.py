"""The ``frostline`` subcommands, one module each.

Every module has ``NAME``, ``HELP``, ``DESCRIPTION``, an ``Options`` dataclass (its
fields are the flags, see :mod:`frostline.app.config`), ``options(namespace)`` and
``run(options, command)`` returning the exit code.
"""
