"""`python -m rwkv_chat`: the terminal chat (app/terminal.py)."""

import sys

from .app.terminal import main

sys.exit(main())
