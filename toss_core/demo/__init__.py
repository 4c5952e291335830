"""The SmolLM2 demo (`toss demo`, `make run`): model import, packaged data, aligned base, TOSS on top."""
