from virtdp_inspect.cli import main

raise SystemExit(main())
