"""`python -m lightning_tive {fit,validate,test,export} ...`"""

from lightning_tive.cli import main

if __name__ == "__main__":
    main()
