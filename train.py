"""interpretable-zoo command line (see `zoo.cli`): python train.py fit|validate|test|predict|compare|ablate ..."""

from zoo.cli import main

if __name__ == "__main__":
    main()
