from tpshard.cli.main import main

main()
