"""`python -m chatsmith ...` (and `torchrun --nproc-per-node N -m chatsmith sft ...`): the `chatsmith` command."""

import sys

from chatsmith.cli import main

sys.exit(main())
