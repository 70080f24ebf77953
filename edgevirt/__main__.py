from edgevirt.cli import main

main()
