"""Lets `python -m perceiver_cli` run the `perceiver` command."""

from perceiver_cli.cli import main

# The guard matters: spawned worker processes re-import this module as __mp_main__ and must not rerun the CLI.
if __name__ == "__main__":
    main()
