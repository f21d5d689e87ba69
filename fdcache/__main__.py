from fdcache.cli.app import main

main()
