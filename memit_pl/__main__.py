from memit_pl.cli import main

raise SystemExit(main())
