from sentilens.cli import main

main()
