"""``python -m stepsearch`` (and ``accelerate launch -m stepsearch``)."""

from stepsearch.cli import main

main()
