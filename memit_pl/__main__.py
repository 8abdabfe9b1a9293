from memit_pl.cli.main import main

raise SystemExit(main())
