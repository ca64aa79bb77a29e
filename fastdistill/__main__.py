from fastdistill.cli import main

main()
