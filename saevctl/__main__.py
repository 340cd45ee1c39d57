"""Entry point for `python -m saevctl` (and `torchrun -m saevctl`)."""

from saevctl.cli import main

main()
