"""`perceiver serve`: an OpenAI-compatible HTTP server for a trained model.

- `schemas`: the request bodies (pydantic) and the OpenAI-shaped responses and errors;
- `engine`: the model thread, which runs every request, with the continuous batch of causal LMs
  (`perceiver_cli.generation.ContinuousBatch`: requests join and leave between generation steps);
- `app`: the HTTP routes (FastAPI), authentication and body limits;
- `server`: uvicorn, with a graceful stop on SIGTERM.

FastAPI and uvicorn come with the `serve` extra (`pip install -e '.[serve]'`); nothing else imports this package.
"""
