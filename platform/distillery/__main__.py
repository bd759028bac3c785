"""`python -m distillery ...` is the same as the `distillery` console script."""

from distillery.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
