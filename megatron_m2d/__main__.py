import sys

from megatron_m2d.cli import main

sys.exit(main())
