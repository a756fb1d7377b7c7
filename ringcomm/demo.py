"""``python -m ringcomm.demo``: the command's name; the demo itself is ``ringcomm/tools/demo.py``."""

if __name__ == "__main__":
    import sys

    from ringcomm.tools.demo import main

    sys.exit(main())
