"""The command-line app: ``frostline demo / fit / summary / predict / evaluate`` (one module each in
:mod:`frostline.app.commands`), run directories, reports and image folders. Needs the ``app`` extra."""
