from ehost_device.cli import main

raise SystemExit(main())
