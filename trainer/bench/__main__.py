"""`python -m trainer.bench …`."""

import sys

from trainer.bench import main

sys.exit(main())
