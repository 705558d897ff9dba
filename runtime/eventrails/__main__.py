"""Run the ``eventrails`` command line as ``python -m eventrails``; local mode starts workers this way."""

from eventrails._cli import main

if __name__ == "__main__":
    main()
