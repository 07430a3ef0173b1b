"""interpretable-zoo command line (see `zoo.cli`): python train.py fit|validate|test|predict|compare|ablate ..."""

from zoo.cli import command_line, main  # noqa: F401  (main: the same commands from Python, errors raised)

if __name__ == "__main__":
    command_line()
