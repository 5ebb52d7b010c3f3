"""``python -m bfc.study`` = ``bfc study``."""
from bfc.study import main

raise SystemExit(main())
