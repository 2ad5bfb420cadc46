from virtdp_discover.cli import main

raise SystemExit(main())
