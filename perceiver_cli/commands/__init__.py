"""One module per `perceiver` subcommand, registered in `perceiver_cli/cli.py`.

A command module stays thin (parse arguments, call the layers below, print) and imports torch, Lightning,
transformers, datasets and pydantic only inside its function bodies, so `perceiver --help` stays fast.
"""
