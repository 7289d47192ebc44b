from sidpipe.cli import main

main()
