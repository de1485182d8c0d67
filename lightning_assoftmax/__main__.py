"""``python -m lightning_assoftmax``: the same entry point as the ``lightning-assoftmax`` command."""

from lightning_assoftmax.cli import main

if __name__ == "__main__":
    main()
