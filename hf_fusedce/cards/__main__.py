"""python -m hf_fusedce.cards: see hf_fusedce.cards."""
import sys

from . import main

sys.exit(main())
