from mox_core.cli import main

main()
