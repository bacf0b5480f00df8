"""The command-line app: frostline demo / fit / summary, run directories and reports."""
