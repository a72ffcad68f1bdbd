"""`python -m homeiq_trainer`."""

from homeiq_trainer.cli import main

raise SystemExit(main())
