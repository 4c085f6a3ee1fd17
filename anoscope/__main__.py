from anoscope.cli import main

raise SystemExit(main())
