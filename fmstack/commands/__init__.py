"""The `fmstack` sub-commands, one module each: `configure(parser)` adds the command's arguments and
`run(args) -> exit code` carries it out. `fmstack/cli.py` lists them in one table; no library module
imports this package (the commands sit on top of everything else)."""
