from imbssl.cli import main

main()
